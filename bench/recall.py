"""`python -m bench.recall`: how well memory recall (billing.conversations, PostgreSQL full-text search) finds a
planted fact, how often it injects something into an unrelated question, and what recall costs per call.

One key learns 24 facts, one exchange each, among `--noise` exchanges of other chat (by default 2,000, built from
a fixed vocabulary with a fixed seed). Three sets of questions then recall with the default rules
(`memory_budget_tokens` 1,000, `memory_max_items` 8):

- direct: the question shares a content word with its fact ("What is my dog called?" for "My dog is called
  Biscuit"); a hit is the fact among what is injected, top-1 is it ranked first;
- paraphrased: the question shares no word stem with its fact ("Which pet do I own?"); full-text search cannot see
  the link, and this set measures that limit rather than hiding it;
- unrelated: questions on other subjects; an injection is anything recalled at all.

It runs on its own embedded PostgreSQL (pgserver) in a temporary directory, or `--database-url` (a database it may
fill: it creates an account and a key of its own). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from billing import accounts, conversations, db, keys, schema  # noqa: E402 - after making the project importable
from billing.conversations import MemoryRules  # noqa: E402

# (fact the user told, a question sharing a word with it, a paraphrase sharing none)
FACTS = [
    ("My dog is called Biscuit.", "What is my dog's name?", "Which pet do I own?"),
    ("I am allergic to peanuts.", "Which foods am I allergic to?", "Is there anything I must not eat?"),
    ("My sister lives in Toronto.", "Where does my sister live?", "In which city is my sibling based?"),
    ("I drive a blue Subaru Outback.", "What car do I drive?", "Which vehicle is mine?"),
    ("Our project code word is Tangerine.", "What is the project code word?", "Remind me of our secret term."),
    ("My birthday is on the 14th of March.", "When is my birthday?", "What date was I born?"),
    ("I work as a nurse at the city hospital.", "Where do I work?", "What is my job?"),
    ("My favourite colour is teal.", "What is my favourite colour?", "Which hue do I like best?"),
    ("I play the cello in an amateur orchestra.", "Which instrument do I play in the orchestra?",
     "What music do I make?"),
    ("My daughter Maya started school in September.", "When did my daughter start school?",
     "How old is my child?"),
    ("I am training for the Berlin marathon.", "Which marathon am I training for?", "What race is coming up?"),
    ("My laptop is a ThinkPad X1 Carbon.", "What laptop do I use?", "Which computer do I own?"),
    ("I prefer my coffee black without sugar.", "How do I take my coffee?", "What is my usual morning drink?"),
    ("My landlord is called Mr Okafor.", "What is my landlord's name?", "Who owns the flat I rent?"),
    ("I am learning Portuguese on weekends.", "Which language am I learning?", "What am I studying?"),
    ("My wife's name is Ingrid.", "What is my wife called?", "Who am I married to?"),
    ("I keep bees in the back garden.", "Do I keep bees?", "What insects do I look after?"),
    ("My bank account is with Nordbank.", "Which bank holds my account?", "Where do I keep my savings?"),
    ("I moved to Lisbon in 2021.", "When did I move to Lisbon?", "How long have I been in Portugal?"),
    ("My cat Pepper is afraid of thunderstorms.", "What is my cat afraid of?", "Which animal hates storms?"),
    ("I use Neovim as my text editor.", "Which text editor do I use?", "What do I write code in?"),
    ("My flight to Nairobi leaves on Friday.", "When does my flight to Nairobi leave?", "When am I travelling?"),
    ("I have a meeting with the auditors every Tuesday.", "When do I meet the auditors?",
     "What happens at the start of each week?"),
    ("My grandmother's recipe uses cardamom and saffron.", "Which spices are in my grandmother's recipe?",
     "What flavours does the family dish have?"),
]
UNRELATED = [
    "How do I reverse a list in Python?", "Explain quantum entanglement simply.", "Write a haiku about autumn.",
    "What is the capital of Australia?", "Summarise the causes of the French Revolution.",
    "How does TCP congestion control work?", "Convert 70 Fahrenheit to Celsius.", "Suggest a name for a bakery.",
    "What is a monad in functional programming?", "Translate 'good morning' into Japanese.",
    "How many moons does Jupiter have?", "Give me a regex for email addresses.",
    "What is the difference between RAM and ROM?", "Plan a three-day trip to Kyoto.",
    "Why is the sky blue?", "Explain how vaccines train the immune system.",
]
_NOISE_WORDS = ["weather", "report", "kettle", "spreadsheet", "invoice", "river", "mountain", "gadget", "lecture",
                "physics", "poem", "chess", "garden", "tomato", "server", "kernel", "syntax", "museum", "bicycle",
                "harbour", "violin", "tennis", "budget", "novel", "painting", "volcano", "satellite", "recipe",
                "fabric", "lantern"]


async def _learn(conn: Any, account_id: str, key_id: str, user_text: str, answer: str) -> None:
    content = conversations.memory_content([{"role": "user", "content": user_text}], {"content": answer})
    memory = {"id": str(uuid.uuid4()), "content": content,
              "tokens": await conversations.message_weight({"role": "system", "content": f"- {content}"})}
    await conn.execute("SELECT meterline_converse($1, $2, $3, true, 'bench', $4, $5, $6, 'english')",
                       uuid.uuid4(), account_id, key_id, f"req_{uuid.uuid4().hex}",
                       [{"role": "user", "message": {"role": "user", "content": user_text}, "tokens": 1}], memory)


async def run(url: str, noise: int) -> dict[str, Any]:
    conn = await db.connect(url)
    try:
        await schema.migrate(conn)
        account = await accounts.create_account(conn, name="recall bench")
        key, _ = await keys.create_key(conn, account_id=account["id"], name="recall", detailed_logging=True)
        rng = random.Random(11)
        for _ in range(noise):
            words = " ".join(rng.choice(_NOISE_WORDS) for _ in range(12))
            await _learn(conn, account["id"], key["id"], f"Tell me about {words}.", f"Here is a note on {words}.")
        for fact, _, _ in FACTS:
            await _learn(conn, account["id"], key["id"], fact, "Noted, I will remember that.")
        rules = MemoryRules(language="english", budget_tokens=1_000, max_items=8)
        timings: list[float] = []

        async def recalled(question: str) -> list[str]:
            started = time.perf_counter()
            found = await conversations.recall(conn, account_id=account["id"], key_id=key["id"], exclude=None,
                                               text=question, rules=rules)
            timings.append((time.perf_counter() - started) * 1000)
            return [m.content for m in found]

        result: dict[str, Any] = {"memories": noise + len(FACTS)}
        for name, column in (("direct", 1), ("paraphrased", 2)):
            hits = top1 = 0
            missed: list[str] = []
            for row in FACTS:
                found = await recalled(row[column])
                hit = any(row[0] in content for content in found)
                hits += hit
                top1 += bool(found) and row[0] in found[0]
                if not hit:
                    missed.append(row[column])
            result[name] = {"questions": len(FACTS), "recalled": hits, "top_1": top1,
                            **({"missed": missed} if name == "direct" else {})}
        injected = {question: len(await recalled(question)) for question in UNRELATED}
        result["unrelated"] = {"questions": len(UNRELATED), "with_injection": sum(1 for n in injected.values() if n),
                               "memories_injected": sum(injected.values()),
                               "injected_into": [question for question, n in injected.items() if n]}
        result["recall_ms"] = {"p50": round(statistics.median(timings), 2),
                               "max": round(max(timings), 2)}
        return result
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--noise", type=int, default=2_000, help="other exchanges the key has learned")
    args = parser.parse_args()
    if args.database_url:
        print(json.dumps(asyncio.run(run(args.database_url, args.noise)), indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="meterline-recall-") as data:
        print(json.dumps(asyncio.run(run(db.embedded_database_url(Path(data)), args.noise)), indent=2))


if __name__ == "__main__":
    main()
