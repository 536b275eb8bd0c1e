"""Qwen's tokenizer two ways: tiktoken itself vs the `tokenizers` fast tokenizer pagedserve converts it into
(pagedserve/model/qwen_tokenizer.py). Both must give the same ids; this says which is faster.

    python benchmarks/qwen_tokenizer_speed.py [--repeat 5]

Encodes a mixed Chinese/English/code/emoji corpus (tests/model/test_qwen_tokenizer.py's, repeated to
~0.5 MB), one text at a time as the server does (single-threaded both: RAYON_NUM_THREADS=1), and as
one request-sized piece (2 KB); prints MB/s and writes qwen_tokenizer_speed.json to $OUT (else ./out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from pagedserve.model import qwen_tokenizer as QT
    from tests.model.test_qwen_tokenizer import CORPUS

    d = Path(tempfile.mkdtemp())
    (d / "qwen.tiktoken").write_bytes(QT.packaged_tiktoken().read_bytes())
    fast = QT.load_qwen_tokenizer(d)
    specials = {t: QT.NUM_RANKS + i for i, t in enumerate(QT.SPECIAL_TOKENS)}
    ref = tiktoken.Encoding("qwen", pat_str=QT.PATTERN, mergeable_ranks=load_tiktoken_bpe(str(d / "qwen.tiktoken")),
                            special_tokens=specials)
    text = "\n".join(CORPUS)
    big = text * max(1, 500_000 // len(text.encode()))
    pieces = [big[i:i + 2048] for i in range(0, len(big), 2048)]

    def tk(s: str) -> list[int]:  # what Qwen's own tokenizer does: NFC, then tiktoken
        return ref.encode(unicodedata.normalize("NFC", s), allowed_special="all", disallowed_special=())

    def hf(s: str) -> list[int]:
        return fast.encode(s, add_special_tokens=False)

    def backend(s: str) -> list[int]:  # the Rust tokenizer without the transformers wrapper
        return fast.backend_tokenizer.encode(s, add_special_tokens=False).ids

    assert all(tk(p) == hf(p) == backend(p) for p in pieces[:50]), "the two tokenizers disagree"
    mb = len(big.encode()) / 1e6
    res = {}
    for name, fn in (("tiktoken", tk), ("fast (transformers)", hf), ("fast (tokenizers)", backend)):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for p in pieces:
                fn(p)
            best = min(best, time.perf_counter() - t0)
        res[name] = {"mb_per_s": mb / best, "us_per_2kb_request": best / len(pieces) * 1e6}
        print(f"{name:<20} {mb / best:6.2f} MB/s  {best / len(pieces) * 1e6:7.0f} us per 2 KB request")
    out = Path(os.environ.get("OUT") or ROOT / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "qwen_tokenizer_speed.json").write_text(json.dumps({"corpus_mb": mb, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
