"""The study experiments (experiments/clip_scenes.py, lm_upcycle_mix.py) whose tiny twins train together in
test_studies.py (a few compiles for all of them) instead of one by one in test_train.py."""

import re

from moejax import registry

GROUPED_TWINS = tuple(n for n in registry.names()
                      if n.startswith("scenes_clip_") or re.fullmatch(r"lm_(dense|upcycle)_mix_(\d+|wsd)_tiny", n))
