"""SmolLM2 with the sample adapters: greedy output with speculation is token-identical to
plain decoding, base and adapter rows in one batch, with both proposers (n-gram lookup,
and a draft cut from SmolLM2 itself: its first 4 layers and its head, running each
row's adapter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import EngineConfig
from worker.engine import Engine
from worker.sequence import SamplingParams

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "adapters"
TEXTS = [
    "Copy this sentence exactly: The quick brown fox jumps over the lazy dog by the river.",
    "Extract the city names from this text: I flew from Paris to Berlin, then took a "
    "train to Vienna and a bus to Prague.",
    "Summarize in one sentence: The Eiffel Tower is a wrought-iron lattice tower in Paris. "
    "It was designed by Gustave Eiffel's company and completed in 1889 for the World's Fair.",
]
GREEDY = SamplingParams(max_tokens=24)
CONFIGS = {
    "ngram": dict(speculative="ngram"),
    # A 4-layer cut guesses poorly; a fixed γ verifies (and mostly rejects) every step.
    "draft": dict(speculative="draft", draft_layers=4, speculative_adaptive=False),
}


def mixed_batch(smollm2_dir: Path, **config: object) -> tuple[list[list[int]], Engine]:
    engine = Engine.from_config(
        EngineConfig(model=str(smollm2_dir), memory_mb=256, **config)  # type: ignore[arg-type]
    )
    for name in ("upper", "json"):
        engine.register_adapter(name, SAMPLES / name)
    prompts = [[{"role": "user", "content": text}] for text in TEXTS]
    jobs = [(p, a) for p in prompts for a in (None, "upper", "json")]
    events = engine.generate([p for p, _ in jobs], GREEDY, [a for _, a in jobs])
    return [e.token_ids for e in events], engine


@pytest.fixture(scope="module")
def plain(smollm2_dir: Path) -> list[list[int]]:
    return mixed_batch(smollm2_dir)[0]


@pytest.mark.slow
@pytest.mark.parametrize("proposer", CONFIGS)
def test_greedy_smollm2_with_speculation_is_token_identical(
    proposer: str, smollm2_dir: Path, plain: list[list[int]]
) -> None:
    config = dict(CONFIGS[proposer])
    if proposer == "draft":
        config["draft_model"] = str(smollm2_dir)
    got, engine = mixed_batch(smollm2_dir, **config)
    assert got == plain
    stats = engine.stats()
    assert stats.spec_proposed > 0
    if proposer == "ngram":  # the prompts' texts are copied: drafts are accepted, and some
        # steps emit several tokens (how many depends on the adaptive γ over a batch of 9)
        assert stats.spec_accepted > 0 and stats.spec_tokens_per_step > 1.0
    assert {adapter for adapter, _ in stats.spec_by_adapter} == {"", "upper", "json"}
    assert stats.kv_pages == 0  # target and draft pages all back
