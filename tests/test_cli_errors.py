"""Bad input to every CLI verb: exit 2, exactly one stderr line `moejax: error: ...` naming the problem, no
traceback, and nothing written (the test's directory, the current directory and the existing runs are unchanged).

`CASES` is the table: to cover a new verb or a new mistake, add a `Case(id, argv, message)` row. `argv` may use
these placeholders, built once per module (see `dirs`):
  {run}      a finished 2-step lm_dense_tiny run (run_helpers.TINY_LM), checkpoints at steps 1 and 2
  {hf}       that run exported as a Hugging Face Llama (config.json + model.safetensors)
  {bad_json_run}  {run} with a truncated config.json
  {bad_ckpt_run}  {run} with every checkpoint's array data truncated
  {ttmm_base}  {run} with its step 2 removed (so another base: newest step 1)
  {bank}     a TTMM bank (2 experts, 1 step, 8 documents) built on {ttmm_base}
  {bad_json_hf}   {hf} with a truncated config.json
  {bad_st_hf}     {hf} with a truncated model.safetensors
  {moe_cfg}  a directory holding only the config.json of a tiny 8-expert top-2 MoE (prune checks it first)
  {ft}       a 1-step LoRA fine-tune of {run} (its checkpoints hold adapters only)
  {ft_moved}, {ft_rebased}  {ft} whose recorded base is gone / is {ttmm_base} (another step: its hash differs)
  {future_run}  {run} whose config.json carries a key this moejax does not know (a run from a newer moejax)
  {file}     an existing regular file     {empty}  an existing empty directory
  {new}      a path that does not exist yet (inside the test's own directory, which is also the cwd)
`TINY` expands to the tiny config's overrides, so `["train", "lm_dense_tiny", TINY, ...]` names the same config
as {run}. The cases run in-process through `cli.main` (fast); `SUBPROCESS` repeats a few as real `moejax`
processes, which must print the same line and nothing else (no traceback, no orbax shutdown noise).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
from run_helpers import TINY_LM, tree

TINY = "<tiny>"


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  argv: tuple
  message: str  # must appear in the one error line


def _c(id_, *argv, msg):
  return Case(id_, argv, msg)


CASES = [
  # experiments
  _c("exp-unknown-name", "experiments", "show", "lm_dense_tinyy", msg="unknown experiment 'lm_dense_tinyy'; did you mean"),
  _c("exp-no-name", "experiments", "show", msg="experiments show needs a NAME"),
  _c("exp-bad-action", "experiments", "frobnicate", msg="invalid choice: 'frobnicate'"),
  _c("exp-unknown-key", "experiments", "show", "lm_dense_tiny", "model.num_layer=2",
     msg="unknown key 'model.num_layer'; did you mean 'model.num_layers'"),
  _c("exp-not-key-value", "experiments", "show", "lm_dense_tiny", "model.num_layers",
     msg="must look like key=value"),
  _c("exp-int-as-str", "experiments", "show", "lm_dense_tiny", "train.steps=ten", msg="train.steps: expected int"),
  _c("exp-int-as-float", "experiments", "show", "lm_dense_tiny", "model.moe.top_k=1.5",
     msg="model.moe.top_k: expected int"),
  _c("exp-bool-as-int", "experiments", "show", "lm_dense_tiny", "model.remat=1", msg="model.remat: expected bool"),
  _c("exp-inf-float", "experiments", "show", "lm_dense_tiny", "optim.lr=1e999", msg="optim.lr=inf is not a finite"),
  _c("exp-neg-inf-float", "experiments", "show", "lm_dense_tiny", "model.rope_theta=-1e999",
     msg="model.rope_theta=-inf is not a finite"),
  _c("exp-nan-word", "experiments", "show", "lm_dense_tiny", "optim.lr=nan", msg="optim.lr: expected float"),
  _c("exp-huge-int", "experiments", "show", "lm_dense_tiny", "train.steps=" + "1" + "0" * 30,
     msg="train.steps=1000000000000000000000000000000 is out of range"),
  _c("exp-negative-steps", "experiments", "show", "lm_dense_tiny", "train.steps=-1", msg="train.steps must be >= 0"),
  _c("exp-zero-lr", "experiments", "show", "lm_dense_tiny", "optim.lr=0", msg="optim.lr must be > 0"),
  _c("exp-b2-out-of-range", "experiments", "show", "lm_dense_tiny", "optim.b2=1.0", msg="0 <= b2 < 1"),
  _c("exp-top-k-too-big", "experiments", "show", "lm_dense_tiny", "model.moe.num_experts=4", "model.moe.top_k=5",
     msg="moe.top_k=5 must be in [1, moe.num_experts=4]"),
  _c("exp-bad-choice", "experiments", "show", "lm_dense_tiny", "model.moe.router=nope", msg="moe.router='nope' unknown"),
  _c("exp-zero-patch", "experiments", "show", "clip_dense_tiny", "clip.patch_size=0", msg="clip.patch_size=0"),
  _c("exp-tuple-inf", "experiments", "show", "clip_dense_tiny", "clip.image_std=[0.5, 1e999, 0.5]",
     msg="clip.image_std[1]=inf is not a finite"),
  _c("exp-file-missing", "experiments", "show", "{new}/x.py:foo", msg="does not exist"),
  _c("no-verb", "frobnicate", msg="invalid choice: 'frobnicate'"),
  _c("verb-typo", "trian", msg="invalid choice: 'trian'; did you mean 'train'?"),
  # train
  _c("train-unknown-name", "train", "lm_dens_tiny", "--workdir", "{new}", msg="did you mean 'lm_dense_tiny'"),
  _c("train-no-name", "train", msg="the following arguments are required: name"),
  _c("train-workdir-is-file", "train", "lm_dense_tiny", TINY, "--workdir", "{file}", msg="is an existing file"),
  _c("train-workdir-under-file", "train", "lm_dense_tiny", TINY, "--workdir", "{file}/run", msg="is a file, not a dir"),
  _c("train-object-store", "train", "lm_dense_tiny", TINY, "--workdir", "gs://bucket/run",
     msg="gs:// paths are not supported"),
  _c("train-inf-lr", "train", "lm_dense_tiny", TINY, "optim.lr=1e999", "--workdir", "{new}", msg="optim.lr=inf"),
  _c("train-indivisible-batch", "train", "lm_dense_tiny", TINY, "data.batch_size=6", "mesh.data=4", "mesh.fsdp=2",
     "--workdir", "{new}", msg="not divisible by the 8 data-parallel shards"),
  _c("train-resume-model-changed", "train", "lm_dense_tiny", TINY, "model.d_ff=48", "--workdir", "{run}",
     msg="model.d_ff (saved 64, requested 48)"),
  _c("train-resume-other-experiment", "train", "lm_moe_tiny", "--workdir", "{run}", msg="model.moe.num_experts"),
  _c("train-resume-data-changed", "train", "lm_dense_tiny", TINY, "data.seq_len=16", "--workdir", "{run}",
     msg="data.seq_len (saved 32, requested 16)"),
  _c("train-resume-seed-changed", "train", "lm_dense_tiny", TINY, "train.seed=1", "--workdir", "{run}",
     msg="train.seed (saved 0, requested 1)"),
  _c("train-bad-int-flag", "train", "lm_dense_tiny", "--num-processes", "two", msg="invalid int value: 'two'"),
  _c("train-float16", "train", "lm_dense_tiny", TINY, "model.compute_dtype=float16", "--workdir", "{new}",
     msg="model.compute_dtype='float16' cannot train"),
  _c("train-bf16-master", "train", "lm_dense_tiny", TINY, "model.param_dtype=bfloat16", "--workdir", "{new}",
     msg="master params and AdamW moments"),
  _c("train-cudnn-on-cpu", "train", "lm_dense_tiny", TINY, "model.attention_impl=cudnn", "--workdir", "{new}",
     msg="model.attention_impl='cudnn' needs an NVIDIA GPU"),
  _c("exp-bad-attention-impl", "experiments", "show", "lm_dense_tiny", "model.attention_impl=flash",
     msg="model.attention_impl='flash': choose auto, xla, cudnn or einsum"),
  _c("exp-bad-remat-policy", "experiments", "show", "lm_dense_tiny", "model.remat_policy=some",
     msg="model.remat_policy='some': choose full"),
  _c("exp-bad-ep-exchange", "experiments", "show", "lm_moe_tiny", "model.moe.ep_exchange=rag",
     msg="moe.ep_exchange='rag': choose fixed or ragged"),
  _c("exp-ragged-capacity", "experiments", "show", "lm_moe_tiny", "model.moe.ep_exchange=ragged",
     "model.moe.dispatch=capacity", msg="moe.ep_exchange='ragged' needs moe.dispatch='dropless'"),
  _c("train-ragged-on-cpu", "train", "lm_moe_tiny", TINY, "model.moe.ep_exchange=ragged", "--workdir", "{new}",
     msg="ep_exchange='ragged' needs a GPU or TPU"),
  _c("exp-bad-gmm-backend", "experiments", "show", "lm_moe_tiny", "model.moe.gmm_backend=pallas",
     msg="choose auto, ragged_dot, sorted, dense or megablox"),
  _c("exp-bad-profile-steps", "experiments", "show", "lm_dense_tiny", "train.profile_steps=[5,2]",
     msg="train.profile_steps=[5, 2]: give [N, M]"),
  # eval
  _c("eval-missing-workdir", "eval", "--workdir", "{new}", msg="does not exist"),
  _c("eval-workdir-is-file", "eval", "--workdir", "{file}", msg="is a file, not a directory"),
  _c("eval-empty-workdir", "eval", "--workdir", "{empty}", msg="no checkpoint in"),
  _c("eval-other-experiment", "eval", "lm_moe_tiny", "--workdir", "{run}", msg="will not evaluate it"),
  _c("eval-override-changes-model", "eval", "--workdir", "{run}", "model.d_ff=48", msg="model.d_ff (saved 64"),
  _c("eval-truncated-config", "eval", "--workdir", "{bad_json_run}", msg="config.json is not valid JSON"),
  _c("eval-truncated-checkpoint", "eval", "--workdir", "{bad_ckpt_run}", msg="no readable checkpoint"),
  _c("eval-object-store", "eval", "--workdir", "s3://bucket/run", msg="s3:// paths are not supported"),
  _c("eval-no-workdir", "eval", msg="the following arguments are required: --workdir"),
  # report
  _c("report-missing-dir", "report", "{new}", msg="does not exist"),
  _c("report-dir-is-file", "report", "{file}", msg="is a file, not a directory"),
  _c("report-not-a-run", "report", "{empty}", msg="has no metrics.jsonl"),
  # compile (moejax/aot): checked by arithmetic on the config and the topology, before libtpu is asked
  _c("compile-unknown-topology", "compile", "lm_moe_tiny", "--topology", "v5q-128", msg="did you mean 'v5p-128'"),
  _c("compile-mesh-vs-topology", "compile", "lm_moe_tiny", "mesh.data=3", "--topology", "v5p:2x2x1",
     msg="mesh.data=3"),
  _c("compile-batch", "compile", "lm_moe_tiny", "data.batch_size=6", "--topology", "v5p:2x2x1",
     msg="data.batch_size=6"),
  _c("compile-experts", "compile", "lm_moe_tiny", "mesh.data=1", "mesh.expert=4", "model.moe.num_experts=6",
     "--topology", "v5p:2x2x1", msg="model.moe.num_experts=6 is not divisible by mesh.expert=4"),
  _c("compile-save-is-file", "compile", "lm_moe_tiny", "--topology", "v5p:2x2x1", "--save", "{file}",
     msg="is an existing file"),
  _c("report-out-is-file", "report", "{run}", "--out", "{file}", msg="is an existing file"),
  # fine-tuning and data (peft, mixtures, tasks)
  _c("train-mixture-unknown-source", "train", "lm_moe_mix_tiny", "data.mixture=[('moejax_pydocs', 1.0)]",
     "--workdir", "{new}", msg="moejax_pydoc"),
  _c("exp-mixture-negative-weight", "experiments", "show", "lm_moe_mix_tiny", "data.mixture=[('moejax_pydoc', -1.0)]",
     msg="weights must be finite and >= 0"),
  _c("exp-mixture-all-zero", "experiments", "show", "lm_moe_mix_tiny", "data.mixture=[('moejax_pydoc', 0.0)]",
     msg="all weights are 0"),
  _c("exp-unknown-task", "experiments", "show", "lm_moe_mix_tiny", "data.tasks=['additon']",
     msg="did you mean 'addition'"),
  _c("exp-peft-unknown-method", "experiments", "show", "lm_dense_tiny", "peft.method=loraa",
     msg="peft.method='loraa' unknown"),
  _c("exp-peft-density", "experiments", "show", "lm_dense_tiny", "peft.method=spiel_ag", "peft.density=1.5",
     msg="peft.density=1.5 must be in (0, 1]"),
  _c("train-peft-without-base", "train", "lm_dense_tiny", TINY, "peft.method=lora", "--workdir", "{new}",
     msg="needs init.peft_from"),
  # generate
  _c("generate-empty-prompt", "generate", "--workdir", "{run}", "--prompt", "", msg="empty"),
  _c("generate-too-long", "generate", "--workdir", "{run}", "--prompt", "hi", "--max-new-tokens", "100000",
     msg="max_seq_len"),
  _c("generate-negative-temperature", "generate", "--workdir", "{run}", "--prompt", "hi", "--temperature", "-1",
     msg="--temperature=-1.0 must be >= 0"),
  _c("generate-top-p-zero", "generate", "--workdir", "{run}", "--prompt", "hi", "--top-p", "0",
     msg="--top-p=0.0 must be in (0, 1]"),
  _c("generate-top-p-above-one", "generate", "--workdir", "{run}", "--prompt", "hi", "--top-p", "1.5",
     msg="--top-p=1.5 must be in (0, 1]"),
  _c("generate-new-tokens-not-int", "generate", "--workdir", "{run}", "--prompt", "hi", "--max-new-tokens", "x",
     msg="invalid int value: 'x'"),
  _c("generate-no-checkpoint", "generate", "--workdir", "{empty}", "--prompt", "hi", msg="neither a moejax workdir"),
  _c("generate-missing-workdir", "generate", "--workdir", "{new}", "--prompt", "hi", msg="no such directory"),
  _c("generate-workdir-is-file", "generate", "--workdir", "{file}", "--prompt", "hi", msg="neither a moejax workdir"),
  _c("generate-missing-prompts-file", "generate", "--workdir", "{run}", "--prompts-file", "{new}/p.txt",
     msg="no such file"),
  _c("generate-truncated-config", "generate", "--workdir", "{bad_json_run}", "--prompt", "hi", msg="config.json"),
  # ttmm (a bank built on {ttmm_base}: {run} at step 1)
  _c("ttmm-clusters-above-documents", "ttmm", "build", "--from", "{run}", "--clusters", "100000", "--to", "{new}",
     msg="--clusters 100000 but the corpus (moejax_pycode, train split) has"),
  _c("ttmm-clusters-zero", "ttmm", "build", "--from", "{run}", "--clusters", "0", "--to", "{new}",
     msg="--clusters 0 must be >= 1"),
  _c("ttmm-beta-zero", "ttmm", "build", "--from", "{run}", "--clusters", "2", "--to", "{new}", "ttmm.beta=0",
     msg="ttmm.beta=0.0 must be > 0"),
  _c("ttmm-tau-one", "ttmm", "build", "--from", "{run}", "--clusters", "2", "--to", "{new}", "ttmm.tau=1.0",
     msg="ttmm.tau=1.0 must be in [0, 1)"),
  _c("ttmm-eval-tau-negative", "ttmm", "eval", "--bank", "{bank}", "ttmm.tau=-0.5", msg="ttmm.tau=-0.5 must be in [0, 1)"),
  _c("ttmm-eval-beta-negative", "ttmm", "eval", "--bank", "{bank}", "ttmm.beta=-1", msg="ttmm.beta=-1.0 must be > 0"),
  _c("ttmm-eval-other-base", "ttmm", "eval", "--bank", "{bank}", "--base", "{run}", msg="was built on another base"),
  _c("ttmm-generate-other-base", "generate", "--workdir", "{run}", "--ttmm", "{bank}", "--prompt", "def f(",
     msg="was built on another base"),
  _c("ttmm-eval-not-a-bank", "ttmm", "eval", "--bank", "{run}", msg="is not a TTMM bank"),
  _c("ttmm-eval-unknown-method", "ttmm", "eval", "--bank", "{bank}", "--methods", "base,ttm",
     msg="did you mean 'ttmm'"),
  _c("ttmm-build-missing-base", "ttmm", "build", "--from", "{new}", "--clusters", "2", "--to", "{new}/b",
     msg="does not exist"),
  _c("ttmm-build-to-is-base", "ttmm", "build", "--from", "{run}", "--clusters", "2", "--to", "{run}",
     msg="is the base run itself"),
  _c("ttmm-train-no-base", "train", "lm_pycode_ttmm4_tiny", "--workdir", "{new}",
     msg="a TTMM bank needs its base run: set init.peft_from=RUN"),
  _c("ttmm-train-workdir-is-base", "train", "lm_pycode_ttmm4_tiny", "init.peft_from={run}", "--workdir", "{run}",
     msg="is the base run itself"),
  # merge
  _c("merge-not-a-finetuning-run", "merge", "--workdir", "{run}", "--to", "{new}", msg="is not a fine-tuning run"),
  _c("merge-missing-workdir", "merge", "--workdir", "{new}", "--to", "{new}/out", msg="does not exist"),
  _c("merge-workdir-is-file", "merge", "--workdir", "{file}", "--to", "{new}", msg="is a file, not a directory"),
  _c("merge-to-is-file", "merge", "--workdir", "{ft}", "--to", "{file}", msg="is an existing file"),
  _c("merge-to-holds-a-run", "merge", "--workdir", "{ft}", "--to", "{run}", msg="already holds checkpoints"),
  _c("merge-to-is-the-run", "merge", "--workdir", "{ft}", "--to", "{ft}", msg="is the run itself"),
  # a fine-tune or a bank where a whole model's run belongs, and the reverse
  _c("upcycle-from-finetune", "upcycle", "--from", "{ft}", "--exp", "lm_upcycle_tiny", TINY, "--to", "{new}",
     msg="is a fine-tuning run (peft.method=lora"),
  _c("upcycle-from-bank", "upcycle", "--from", "{bank}", "--exp", "lm_upcycle_tiny", TINY, "--to", "{new}",
     msg="is a TTMM bank"),
  _c("train-upcycle-from-finetune", "train", "lm_upcycle_tiny", TINY, "init.upcycle_from={ft}", "--workdir", "{new}",
     msg="fold the adapters in first with `moejax merge"),
  _c("export-from-finetune", "export-hf", "{ft}", "--to", "{new}", msg="fold the adapters in first"),
  _c("export-from-bank", "export-hf", "{bank}", "--to", "{new}", msg="is a TTMM bank"),
  _c("prune-from-finetune", "prune", "--from", "{ft}", "--keep", "4", "--task", "lookup", "--to", "{new}",
     msg="is a fine-tuning run"),
  _c("ttmm-build-from-finetune", "ttmm", "build", "--from", "{ft}", "--clusters", "2", "--to", "{new}",
     msg="is a fine-tuning run"),
  _c("ttmm-build-from-bank", "ttmm", "build", "--from", "{bank}", "--clusters", "2", "--to", "{new}",
     msg="is a TTMM bank"),
  _c("ttmm-build-to-is-a-run", "ttmm", "build", "--from", "{ttmm_base}", "--clusters", "2", "--to", "{run}",
     msg="is not a TTMM bank (it holds an ordinary lm run)"),
  _c("ttmm-build-to-is-a-finetune", "ttmm", "build", "--from", "{ttmm_base}", "--clusters", "2", "--to", "{ft}",
     msg="is not a TTMM bank (it holds a lora fine-tune)"),
  _c("ttmm-build-to-is-file", "ttmm", "build", "--from", "{run}", "--clusters", "2", "--to", "{file}",
     msg="is an existing file"),
  _c("train-peft-base-is-finetune", "train", "lm_dense_tiny", TINY, "peft.method=lora", "init.peft_from={ft}",
     "--workdir", "{new}", msg="is a fine-tuning run"),
  _c("train-peft-base-is-bank", "train", "lm_dense_tiny", TINY, "peft.method=lora", "init.peft_from={bank}",
     "--workdir", "{new}", msg="is a TTMM bank"),
  _c("generate-bank", "generate", "--workdir", "{bank}", "--prompt", "def f(", msg="is a TTMM bank"),
  _c("eval-bank", "eval", "--workdir", "{bank}", msg="is a TTMM bank"),
  _c("generate-finetune-base-moved", "generate", "--workdir", "{ft_moved}", "--prompt", "hi", msg="does not exist"),
  _c("eval-finetune-base-moved", "eval", "--workdir", "{ft_moved}", msg="does not exist"),
  _c("bench-infer-finetune-base-moved", "bench", "infer", "{ft_moved}", msg="does not exist"),
  _c("generate-finetune-base-changed", "generate", "--workdir", "{ft_rebased}", "--prompt", "hi",
     msg="refusing to generate on a different base"),
  _c("eval-finetune-base-changed", "eval", "--workdir", "{ft_rebased}", msg="different base"),
  # a run written by a newer moejax (a config key this one does not know): refused, never rewritten
  _c("eval-newer-run", "eval", "--workdir", "{future_run}", msg="written by a newer moejax"),
  _c("train-resume-newer-run", "train", "lm_dense_tiny", TINY, "--workdir", "{future_run}",
     msg="written by a newer moejax"),
  _c("generate-newer-run", "generate", "--workdir", "{future_run}", "--prompt", "hi", msg="written by a newer moejax"),
  _c("export-newer-run", "export-hf", "{future_run}", "--to", "{new}", msg="written by a newer moejax"),
  # upcycle
  _c("upcycle-missing-from", "upcycle", "--from", "{new}", "--exp", "lm_moe_tiny", "--to", "{new}/to",
     msg="--from"),
  _c("upcycle-unknown-exp", "upcycle", "--from", "{run}", "--exp", "lm_moe_tinyy", "--to", "{new}",
     msg="unknown experiment 'lm_moe_tinyy'"),
  _c("upcycle-to-is-file", "upcycle", "--from", "{run}", "--exp", "lm_moe_tiny", "--to", "{file}",
     msg="is an existing file"),
  _c("upcycle-to-holds-a-run", "upcycle", "--from", "{run}", "--exp", "lm_moe_tiny", "--to", "{run}",
     msg="already holds checkpoints"),
  _c("upcycle-truncated-config", "upcycle", "--from", "{bad_json_run}", "--exp", "lm_moe_tiny", "--to", "{new}",
     msg="config.json is not valid JSON"),
  _c("upcycle-inf-override", "upcycle", "--from", "{run}", "--exp", "lm_moe_tiny", "init.router_std=1e999",
     "--to", "{new}", msg="init.router_std=inf is not a finite"),
  _c("upcycle-no-to", "upcycle", "--from", "{run}", "--exp", "lm_moe_tiny", msg="needs --to DIR"),
  # bench
  _c("bench-unknown", "bench", "nope", msg="invalid choice: 'nope' (choose from "),  # nothing close: no guess
  _c("bench-typo", "bench", "moee", msg="invalid choice: 'moee'; did you mean 'moe'? (choose from "),
  _c("bench-moe-bad-int", "bench", "moe", "--iters", "ten", msg="bench moe: argument --iters: invalid int value"),
  _c("bench-moe-zero-iters", "bench", "moe", "--iters", "0", msg="--iters=0 must be >= 1"),
  _c("bench-moe-unknown-config", "bench", "moe", "--configs", "XL", msg="unknown config(s) ['XL']"),
  _c("bench-moe-unknown-peer", "bench", "moe", "--peers", "hf-nope", msg="--peers ['hf-nope']: want auto, none"),
  _c("bench-train-unknown-exp", "bench", "train", "lm_dense_tinyy", msg="unknown experiment 'lm_dense_tinyy'"),
  _c("bench-train-inf", "bench", "train", "lm_dense_tiny", "optim.lr=1e999", msg="optim.lr=inf"),
  _c("bench-train-zero-steps", "bench", "train", "lm_dense_tiny", "--steps", "0", msg="--steps=0 must be >= 1"),
  _c("bench-infer-bad-int", "bench", "infer", "lm_dense_tiny", "--prompt-len", "x",
     msg="bench infer: argument --prompt-len: invalid int value"),
  _c("bench-infer-bad-batch", "bench", "infer", "lm_dense_tiny", "--batch", "1,x", msg="give comma-separated integers"),
  _c("bench-infer-zero-batch", "bench", "infer", "lm_dense_tiny", "--batch", "0", msg="must be >= 1"),
  _c("bench-infer-no-model", "bench", "infer", msg="bench infer needs a model"),
  _c("bench-peft-zero-rank", "bench", "peft", "--rank", "0", msg="--rank=0 must be >= 1"),
  _c("bench-peft-bad-int", "bench", "peft", "--steps", "x", msg="bench peft: argument --steps: invalid int value"),
  _c("bench-upcycle-bad-int", "bench", "upcycle", "--layers", "x", msg="argument --layers: invalid int value"),
  # import-hf
  _c("import-missing-path", "import-hf", "{new}", "--to", "{new}/to", msg="does not exist"),
  _c("import-path-is-file", "import-hf", "{file}", "--to", "{new}", msg="is a file, not a directory"),
  _c("import-not-hf", "import-hf", "{empty}", "--to", "{new}", msg="config.json not found"),
  _c("import-to-is-file", "import-hf", "{hf}", "--to", "{file}", msg="is an existing file"),
  _c("import-to-holds-a-run", "import-hf", "{hf}", "--to", "{run}", msg="already holds checkpoints"),
  _c("import-truncated-config", "import-hf", "{bad_json_hf}", "--to", "{new}", msg="config.json is not valid JSON"),
  _c("import-truncated-safetensors", "import-hf", "{bad_st_hf}", "--to", "{new}",
     msg="model.safetensors is not a readable safetensors file"),
  _c("import-object-store", "import-hf", "{hf}", "--to", "gs://bucket/x", msg="gs:// paths are not supported"),
  _c("import-override-changes-params", "import-hf", "{hf}", "--to", "{new}", "model.d_ff=48",
     msg="change the model's params"),
  # export-hf
  _c("export-missing-run", "export-hf", "{new}", "--to", "{new}/out", msg="does not exist"),
  _c("export-to-under-file", "export-hf", "{run}", "--to", "{file}/out", msg="is a file, not a directory"),
  _c("export-to-is-file", "export-hf", "{run}", "--to", "{file}", msg="is an existing file"),
  _c("export-truncated-config", "export-hf", "{bad_json_run}", "--to", "{new}", msg="config.json is not valid JSON"),
  _c("export-truncated-checkpoint", "export-hf", "{bad_ckpt_run}", "--to", "{new}", msg="cannot read the params"),
  _c("export-bad-arch", "export-hf", "{run}", "--to", "{new}", "--arch", "gpt9", msg="invalid choice: 'gpt9'"),
  _c("export-to-is-the-run", "export-hf", "{run}", "--to", "{run}", msg="is the run itself"),
  _c("export-to-holds-a-run", "export-hf", "{run}", "--to", "{bad_json_run}",
     msg="already holds checkpoints, config.json"),
  _c("export-to-holds-an-export", "export-hf", "{run}", "--to", "{hf}",
     msg="already holds config.json, model.safetensors"),
  # prune
  _c("prune-keep-all", "prune", "--from", "{moe_cfg}", "--keep", "8", "--task", "lookup", "--to", "{new}",
     msg="--keep 8 must be in [1, 7]"),
  _c("prune-keep-below-top-k", "prune", "--from", "{moe_cfg}", "--keep", "2", "--top-k", "3", "--task", "lookup",
     "--to", "{new}", msg="--top-k 3 must be in [1, --keep 2]"),
  _c("prune-unknown-task", "prune", "--from", "{moe_cfg}", "--keep", "4", "--task", "lokup", "--to", "{new}",
     msg="unknown task 'lokup'; did you mean 'lookup'"),
  _c("prune-dense-run", "prune", "--from", "{run}", "--keep", "4", "--task", "lookup", "--to", "{new}",
     msg="this run is dense"),
  _c("prune-budget-zero", "prune", "--from", "{moe_cfg}", "--keep", "4", "--task", "lookup", "--budget", "0",
     "--to", "{new}", msg="--budget 0 must be > 0"),
  _c("prune-missing-from", "prune", "--from", "{new}", "--keep", "4", "--task", "lookup", "--to", "{new}/out",
     msg="does not exist"),
  _c("prune-to-is-file", "prune", "--from", "{moe_cfg}", "--keep", "4", "--task", "lookup", "--to", "{file}",
     msg="is an existing file"),
  _c("prune-to-holds-a-run", "prune", "--from", "{moe_cfg}", "--keep", "4", "--task", "lookup", "--to", "{run}",
     msg="already holds checkpoints"),
  _c("prune-no-to", "prune", "--from", "{moe_cfg}", "--keep", "4", "--task", "lookup", msg="needs --to DIR"),
  _c("prune-rerank-negative", "prune", "--from", "{moe_cfg}", "--keep", "4", "--task", "lookup", "--rerank", "-1",
     "--to", "{new}", msg="--rerank -1 must be >= 0"),
  _c("prune-dev-zero", "prune", "--from", "{moe_cfg}", "--keep", "4", "--task", "lookup", "--dev", "0", "--to",
     "{new}", msg="--dev 0 must be > 0"),
  _c("prune-rerank-not-a-number", "prune", "--from", "{moe_cfg}", "--keep", "4", "--task", "lookup", "--rerank",
     "all", "--to", "{new}", msg="argument --rerank: invalid int value: 'all'"),
  _c("prune-bad-method", "prune", "--from", "{moe_cfg}", "--keep", "4", "--task", "lookup", "--method", "magic",
     "--to", "{new}", msg="invalid choice: 'magic'"),
]
# Run also as real processes: the one-line check without capsys, and orbax's threads must not print at exit.
SUBPROCESS = ["eval-empty-workdir", "train-resume-model-changed", "eval-truncated-checkpoint",
              "import-truncated-safetensors", "train-workdir-is-file"]


def _truncate(path):
  path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


@pytest.fixture(scope="module")
def dirs(tiny_lm_run, tmp_path_factory):
  from moejax import cli

  root = tmp_path_factory.mktemp("cli_errors")
  d = {"run": tiny_lm_run, "hf": root / "hf"}
  assert cli.main(["export-hf", str(tiny_lm_run), "--to", str(d["hf"])]) == 0
  d["bad_json_run"] = root / "bad_json_run"
  shutil.copytree(tiny_lm_run, d["bad_json_run"])
  _truncate(d["bad_json_run"] / "config.json")
  d["bad_ckpt_run"] = root / "bad_ckpt_run"
  shutil.copytree(tiny_lm_run, d["bad_ckpt_run"])
  for f in (d["bad_ckpt_run"] / "checkpoints").glob("*/state/**/d/*"):
    _truncate(f)
  from moejax import config, registry

  d["moe_cfg"] = root / "moe_cfg"
  d["moe_cfg"].mkdir()
  (d["moe_cfg"] / "config.json").write_text(config.to_json(registry.get("lm_moe_tiny", list(TINY_LM))))
  for name, f in (("bad_json_hf", "config.json"), ("bad_st_hf", "model.safetensors")):
    d[name] = root / name
    shutil.copytree(d["hf"], d[name])
    _truncate(d[name] / f)
  d["ttmm_base"] = root / "ttmm_base"
  shutil.copytree(tiny_lm_run, d["ttmm_base"])
  shutil.rmtree(d["ttmm_base"] / "checkpoints" / "2")
  d["ft"] = root / "ft"
  assert cli.main(["train", "lm_dense_tiny", *TINY_LM, "peft.method=lora", f"init.peft_from={tiny_lm_run}",
                   "train.steps=1", "--workdir", str(d["ft"]), "--no-progress"]) == 0
  # {ft} with its base moved away / replaced by another run (a base of another step: its hash differs)
  for name, base in (("ft_moved", root / "no_such_base"), ("ft_rebased", d["ttmm_base"])):
    d[name] = root / name
    shutil.copytree(d["ft"], d[name])
    for f in [d[name] / "config.json", *(d[name] / "checkpoints").glob("*/config/metadata")]:
      c = json.loads(f.read_text())
      c["init"]["peft_from"] = str(base)
      f.write_text(json.dumps(c))
  d["future_run"] = root / "future_run"
  shutil.copytree(tiny_lm_run, d["future_run"])
  for f in [d["future_run"] / "config.json", *(d["future_run"] / "checkpoints").glob("*/config/metadata")]:
    future = json.loads(f.read_text())
    future["train"]["a_setting_from_the_future"] = 1
    f.write_text(json.dumps(future))
  d["bank"] = root / "bank"
  assert cli.main(["ttmm", "build", "--from", str(d["ttmm_base"]), "--clusters", "2", "--to", str(d["bank"]),
                   "--no-progress", "ttmm.max_docs=8", "ttmm.doc_tokens=64", "train.steps=1"]) == 0
  return d


def _argv(case, d, tmp):
  subs = {k: str(v) for k, v in d.items()}
  subs.update(file=str(tmp / "a_file.txt"), empty=str(tmp / "empty"), new=str(tmp / "new"))
  out = []
  for a in case.argv:
    out.extend(TINY_LM if a == TINY else [a.format(**subs)])
  return out


def _prepare(tmp):
  (tmp / "a_file.txt").write_text("not a directory\n")
  (tmp / "empty").mkdir()


def _snapshot(d, tmp):
  return {name: tree(p) for name, p in [*d.items(), ("tmp", tmp)]}


def _error_line(rc, out, err, message):
  assert rc == 2, (rc, out, err)
  assert "Traceback" not in err + out, err
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert len(lines) == 1, f"want one stderr line, got {len(lines)}:\n{err}"
  assert lines[0].startswith("moejax: error: "), lines[0]
  assert message in lines[0], lines[0]
  return lines[0]


def _in_process(argv, capsys):
  from moejax import cli

  try:
    rc = cli.main(argv)
  except SystemExit as e:  # argparse
    rc = e.code
  out, err = capsys.readouterr()
  return rc, out, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, dirs, tmp_path, monkeypatch, capsys):
  _prepare(tmp_path)
  monkeypatch.chdir(tmp_path)  # so a path mistaken for a local one (./gs:/bucket) would show up here
  before = _snapshot(dirs, tmp_path)
  rc, out, err = _in_process(_argv(case, dirs, tmp_path), capsys)
  _error_line(rc, out, err, case.message)
  assert _snapshot(dirs, tmp_path) == before, "the command wrote, moved or deleted something"


def test_the_table_covers_every_verb():
  from moejax import cli

  verbs = set(cli.build_parser()._subparsers._group_actions[0].choices)
  covered = {c.argv[0] for c in CASES}
  assert verbs <= covered, f"verbs without bad-input rows: {sorted(verbs - covered)}"
  assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_real_processes_print_the_same_one_line(dirs, tmp_path, capsys):
  """`python -m moejax.cli` as users run it: exit 2, one stderr line identical to the in-process one."""
  by_id = {c.id: c for c in CASES}
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  procs = {}
  for i in SUBPROCESS:  # started together: their start-up (imports) overlaps
    tmp = tmp_path / i
    tmp.mkdir()
    _prepare(tmp)
    procs[i] = (tmp, _snapshot(dirs, tmp), subprocess.Popen(
      [sys.executable, "-m", "moejax.cli", *_argv(by_id[i], dirs, tmp)], cwd=tmp, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  for i, (tmp, before, p) in procs.items():
    out, err = p.communicate(timeout=300)
    line = _error_line(p.returncode, out, err, by_id[i].message)
    assert _snapshot(dirs, tmp) == before, i
    rc2, out2, err2 = _in_process(_argv(by_id[i], dirs, tmp), capsys)
    # the same line, up to the underlying library's details (which tensorstore read fails first may vary)
    assert (rc2, err2.strip().split(" (")[0]) == (2, line.split(" (")[0]), i


# A stand-in for the base install inside the full one: torch, transformers and tokenizers cannot be imported (the
# real base install is CI's scripts/base_smoke.sh). A verb or flag that needs an extra names it, in one line.
NO_EXTRAS = r'''
import importlib.abc, sys
class NoExtras(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("torch", "transformers", "tokenizers"):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoExtras())
'''


@pytest.mark.parametrize("argv", [["bench", "infer", "lm_dense_tiny", "--peer"],
                                  ["bench", "moe", "--peers", "hf-eager", "--configs", "S"]],
                         ids=["bench-infer-peer", "bench-moe-peers"])
def test_a_verb_that_needs_an_extra_names_it(argv, tmp_path):
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(NO_EXTRAS)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
  p = subprocess.run([sys.executable, "-m", "moejax.cli", *argv], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  _error_line(p.returncode, p.stdout, p.stderr, "pip install -e '.[interop]'")
