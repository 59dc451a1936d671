"""The model organism: a small Llama pre-trained from scratch on offline English text (``base``) and its
instruction-tuned copy (``instruct``), trained reproducibly on CPU by ``tuneshift-train-pair``.

Modules, one job each: :mod:`.corpus` (offline sources), :mod:`.tokenizer` (BPE and chat template),
:mod:`.tasks` (instruction data and held-out prompts), :mod:`.train` (pre-training and SFT loops),
:mod:`.evaluate` (generation and scoring), :mod:`.card` (model card), :mod:`.pipeline` (the recipe end to end),
:mod:`.cli` (command line). The committed pair lives in ``models/tiny-pair`` and its held-out prompts in
``heldout_prompts.jsonl`` next to this file.
"""
