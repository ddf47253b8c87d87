"""`moejax bench moe` calls a comparison with transformers' peers level or ahead only on a quiet machine."""

from moejax.bench import moe


def _rows(ours: float, *peers: float) -> list[dict]:
  rows = [{"variant": "dense", "fwdbwd_ratio": 1.0}, {"variant": "dropless", "fwdbwd_ratio": ours}]
  return rows + [{"variant": name, "fwdbwd_ratio": p} for name, p in zip(("hf-eager", "hf-grouped"), peers)]


def test_verdict_against_the_best_peer_on_a_quiet_machine():
  assert moe.verdict(_rows(0.90, 1.10, 1.00), (0.5, 1.2)).startswith("ahead")  # >= 5% under the best peer
  assert moe.verdict(_rows(1.03, 1.10, 1.00), (0.5, 1.2)).startswith("level")  # within 5% of it
  assert moe.verdict(_rows(1.20, 1.10, 1.00), (0.5, 1.2)).startswith("behind")


def test_no_verdict_under_load_or_without_a_peer():
  v = moe.verdict(_rows(0.90, 1.00), (0.5, 2.4))  # the load at the end reached the bar
  assert v.startswith("not judged") and "2.4" in v and "quiet" in v
  assert moe.verdict(_rows(0.90), (0.1, 0.1)) == "not judged: no peer ran"
