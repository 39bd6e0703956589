"""Session-wide test set-up: offline before any Hugging Face import, so a test that would download fails loudly."""

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402  (after the offline environment is set)
import pytest  # noqa: E402

from builders import SENTENCES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "zoo" / "tiny.yaml"


@pytest.fixture(scope="session")
def wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer trained on SENTENCES, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A RoBERTa-style byte-level BPE tokenizer trained on SENTENCES (pad id 1, as RoBERTa expects)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
        model_max_length=64,
    )


@pytest.fixture(scope="session")
def pil_images():
    """Four seeded RGB PIL images of different sizes (the processors resize them)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(40, 36), (32, 32), (50, 30), (28, 28)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="session")
def tiny_config():
    """The tiny zoo's config (configs/zoo/tiny.yaml)."""
    from metashield_hf.zoo import ZooConfig

    return ZooConfig.from_yaml(TINY)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory, tiny_config):
    """``(out_dir, build_report, build_seconds)`` of the tiny zoo, finalized; built once per session (about 1 min),
    shared by tests/zoo and tests/meta."""
    import torch

    from metashield_hf.zoo import build_zoo, finalize_zoo

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    # One thread: these models are too small to gain from two, and on a busy 2-core machine two threads per process
    # made the FL rows 20x slower (oversubscription).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        report = build_zoo(tiny_config, out, progress=False)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    finalize_zoo(out)
    return out, report, seconds


@pytest.fixture(scope="module")
def one_thread():
    """Torch at one intra-op thread for a module (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from a second thread, and on a busy 2-core machine it made them 20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
