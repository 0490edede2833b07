"""Pure pieces on the CPU: page allocator, scheduler, sampling, detokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.worker.memory_helpers import make_scheduler
from worker.detokenizer import Detokenizer, skipped_ids
from worker.memory.allocator import OutOfPages, PageAllocator
from worker.sampling import probabilities, sample
from worker.scheduler import SchedulerLimits
from worker.sequence import SamplingParams, Sequence


def test_page_allocator_is_all_or_nothing_and_checks_frees() -> None:
    pool = PageAllocator(4)
    pages = pool.allocate_kv(3, "a")
    with pytest.raises(OutOfPages):
        pool.allocate_adapter(2, "b")
    assert pool.num_free == 1
    pool.free(pages)
    assert pool.num_free == 4
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([pages[0]])


def seq(rid: str, n: int, arrival: int) -> Sequence:
    return Sequence(rid, list(range(3, 3 + n)), SamplingParams(), None, arrival)


def test_scheduler_chunks_prefill_under_the_token_budget() -> None:
    sched = make_scheduler(100, 4, SchedulerLimits(8, 10))
    sched.add(seq("a", 25, 0))
    sched.add(seq("b", 3, 1))
    first = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in first] == [("a", 10)]
    for item in first:
        item.seq.num_computed += item.num_tokens
    second = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in second] == [("a", 10)]


def test_scheduler_preempts_the_newest_when_pages_run_out() -> None:
    sched = make_scheduler(4, 4, SchedulerLimits(8, 100))
    old, new = seq("old", 8, 0), seq("new", 8, 1)
    sched.add(old)
    sched.add(new)
    for item in sched.schedule():  # both prefill: 2 pages each, pool full
        item.seq.num_computed += item.num_tokens
        item.seq.output_ids.append(1)
    batch = sched.schedule()  # old needs a third page: new is preempted
    assert [s.seq.request_id for s in batch] == ["old"]
    assert new.block_table == [] and new.num_computed == 0
    assert list(sched.waiting) == [new]
    assert sched.num_preemptions == 1


def test_greedy_and_top_k_top_p() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits, [SamplingParams()], [0]) == [1]
    probs = probabilities(logits[0], SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [False, True, False, True]
    probs = probabilities(logits[0], SamplingParams(temperature=1.0, top_p=0.5))
    assert (probs > 0).tolist() == [False, True, False, False]
    assert float(probs.sum()) == pytest.approx(1.0)


def test_seeded_draws_repeat() -> None:
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 1, 2)]
    first = sample(logits.clone(), params, [0, 0, 0])
    assert first == sample(logits.clone(), params, [0, 0, 0])


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_detokenizer_never_emits_broken_utf8(tokenizer: object) -> None:
    text = "naïve café — 日本語のテキスト 🎉 done"
    ids = tokenizer.encode(text)  # type: ignore[attr-defined]
    detok = Detokenizer(tokenizer, [], ())
    pieces = [detok.add(t)[0] for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text


def test_detokenizer_skips_special_tokens_without_growing_its_window(tokenizer: object) -> None:
    skipped = skipped_ids(tokenizer)
    assert {0, 1, 2} < skipped  # endoftext, im_start, im_end, and SmolLM2's other specials
    for i in skipped:  # exactly what decoding drops
        assert tokenizer.decode([i], skip_special_tokens=True) == ""  # type: ignore[attr-defined]
    words = tokenizer.encode(" once upon a time naïve")  # type: ignore[attr-defined]
    ids = [words[0], *[2] * 500, *words[1:3], 0, 5, *words[3:]]  # runs of specials between
    detok = Detokenizer(tokenizer, [], ())
    out = "".join(detok.add(t)[0] for t in ids) + detok.flush()
    assert out == tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
    assert len(detok.ids) <= len(words)  # the window held no special token


def test_detokenizer_stops_at_a_stop_string_across_tokens(tokenizer: object) -> None:
    ids = tokenizer.encode("alpha beta gamma delta")  # type: ignore[attr-defined]
    detok = Detokenizer(tokenizer, [], ("a gam",))
    out, stopped = "", False
    for t in ids:
        piece, stopped = detok.add(t)
        out += piece
        if stopped:
            break
    assert stopped
    assert out == "alpha bet"
