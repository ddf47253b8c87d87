"""`moejax experiments|train|eval|report|upcycle|compile|bench|import-hf|export-hf|generate|merge|prune|ttmm`.

Bad input (unknown experiment or key, a value of the wrong type, a batch the mesh cannot split, a config that
does not match the run's, a missing, truncated or misplaced file) exits 2 with a one-line `moejax: error: ...`
and no traceback, before anything is written; real failures keep their traceback. tests/test_cli_errors.py holds
the table of bad inputs per verb.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
  """What a user's input can cause: named files that are missing, unreadable, truncated or of the wrong kind
  (OS, JSON and safetensors errors name the file), and config errors. Imports nothing an extra brings: this is
  the error path of every verb, and it must work in the base install."""
  from moejax import config, registry

  errors = (config.ConfigError, registry.UnknownExperiment, OSError, json.JSONDecodeError)
  try:
    from safetensors import SafetensorError
  except ImportError:  # a broken or removed install; the base install carries it
    return errors
  return (*errors, SafetensorError)


# Top-level modules that only an extra installs, and the extra that brings each: a verb (or flag) that needs
# one answers, in the base install, with one line naming the extra instead of a ModuleNotFoundError traceback.
EXTRA_FOR_MODULE = {"torch": "interop", "transformers": "interop", "tokenizers": "bpe"}


def missing_extra(e: ImportError) -> str | None:
  """The one-line message for an import of a module that only an extra installs, else None."""
  top = (getattr(e, "name", None) or "").split(".")[0]
  if top not in EXTRA_FOR_MODULE:
    return None
  extra = EXTRA_FOR_MODULE[top]
  return (f"this needs {top!r}, which the base install does not carry: pip install -e '.[{extra}]' "
          f"(or pip install 'moejax[{extra}]')")


class Parser(argparse.ArgumentParser):
  """argparse with moejax's one-line errors: `moejax: error: train: the following arguments are required: ...`
  (no usage block), exit 2. The benchmarks' own parsers use it too."""

  def error(self, message: str):
    where = self.prog.removeprefix("moejax").strip()
    sys.stderr.write(f"moejax: error: {where + ': ' if where else ''}{_closest_choice(message)}\n")
    sys.exit(2)


def _closest_choice(message: str) -> str:
  """argparse's "invalid choice: 'trian' (choose from ...)" with the closest choice named first (Python < 3.14
  does not suggest one)."""
  import difflib
  import re

  m = re.fullmatch(r"(.*invalid choice: '(.*?)')( \(choose from (.*)\))", message)
  if not m:
    return message
  close = difflib.get_close_matches(m[2], [c.strip().strip("'") for c in m[4].split(",")], n=1)
  return f"{m[1]}; did you mean {close[0]!r}?{m[3]}" if close else message


def _quiet_env() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import absl.flags
  import absl.logging

  if not absl.flags.FLAGS.is_parsed():
    absl.flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
  absl.logging.set_verbosity(absl.logging.WARNING)


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("multi-host (see README 'Scale out'; auto-detected on TPU pods and SLURM)")
  g.add_argument("--coordinator", help="HOST:PORT of process 0")
  g.add_argument("--num-processes", type=int)
  g.add_argument("--process-id", type=int)
  g.add_argument("--local-devices", type=int, help="CPU only: fake this many devices per process")


def _start(args) -> None:
  from moejax import distributed

  distributed.initialize(coordinator=getattr(args, "coordinator", None),
                         num_processes=getattr(args, "num_processes", None),
                         process_id=getattr(args, "process_id", None),
                         local_devices=getattr(args, "local_devices", None))


def cmd_experiments(args) -> int:
  from moejax import config, registry

  if args.action == "list":
    for name in registry.names():
      first = (registry.doc(name).splitlines() or [""])[0]
      print(f"{name:32s} {first}")
    return 0
  if not args.name:
    raise config.ConfigError("experiments show needs a NAME (see `moejax experiments list`)")
  cfg = registry.get(args.name, args.overrides)
  print(config.to_json(cfg))
  return 0


def cmd_train(args) -> int:
  _start(args)
  from moejax import paths, registry, train

  cfg = registry.get(args.name, args.overrides)
  workdir = paths.out_dir(args.workdir or os.path.join("runs", cfg.name), "--workdir")
  result = train.train(cfg, workdir, progress=not args.no_progress)
  import jax

  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in result.items() if k != "state"}, indent=2))
  return 0


def cmd_eval(args) -> int:
  from moejax import checkpoint, config, paths, registry, train

  workdir = paths.in_dir(args.workdir, "--workdir")
  overrides = list(args.overrides)
  if args.name and "=" in args.name and ".py:" not in args.name:  # `eval --workdir RUN a.b=v`: no NAME
    args.name, overrides = None, [args.name, *overrides]
  if not checkpoint.step_numbers(workdir):
    raise checkpoint.CheckpointError(f"no checkpoint in {workdir} (is it a moejax run directory?)")
  # NAME: that experiment (it must describe the run's model); none: the run's own config, with the overrides
  cfg = registry.get(args.name, overrides) if args.name else config.apply_overrides(
    checkpoint.read_config(workdir), overrides)
  _start(args)
  print(json.dumps(train.evaluate(workdir, cfg), indent=2))
  return 0


def cmd_compile(args) -> int:
  from moejax.aot import cli as aot_cli  # moejax/aot: the train step compiled for a TPU slice on this host

  return aot_cli.run(args)


def cmd_report(args) -> int:
  from moejax import paths, report

  dirs = [paths.in_dir(d, "run directory") for d in args.dirs]
  out = report.report(dirs, paths.out_dir(args.out, "--out") if args.out else None)
  print(out["table"])
  for f in out["files"]:
    print("wrote", f)
  return 0


def cmd_upcycle(args) -> int:
  """Upcycle a dense run's newest checkpoint into `--exp`'s MoE model and save it as step N (or 0) of a new run
  in `--to`: the params and, when the run continues the dense step, the dense run's data position, but no
  optimizer state (`moejax train EXP --workdir TO` starts a fresh one, as `init.upcycle_from` would)."""

  from moejax import checkpoint, config, paths, registry, runs, train

  paths.in_dir(args.source, "--from")
  checkpoint.read_model_config(args.source, "upcycle --from")  # a fine-tune or a bank: say so, first
  cfg = config.derive(registry.get(args.exp, args.overrides), {"init.upcycle_from": args.source})
  if args.dry_run:
    from moejax import upcycle

    print(upcycle.dry_run(cfg))
    return 0
  if not args.to:
    raise config.ConfigError("moejax upcycle needs --to DIR (or --dry-run to only show the plan)")
  to = runs.check_destination(paths.out_dir(args.to, "--to"))
  _start(args)
  t = runs.target(cfg)
  data_it = train.train_iterator(t)
  params, step = train.initial_params(t, data_it)  # also moves data_it to the dense run's position
  runs.write_params_run(to, t, params, step, data_it)  # params only: the trainer creates the optimizer state
  print(f"upcycled {args.source} -> {to}/checkpoints/{step} ({cfg.name}); continue with: "
        f"moejax train {args.exp} {' '.join(args.overrides)} --workdir {to}".rstrip())
  return 0


def cmd_bench(args, rest: list[str]) -> int:
  import importlib

  from moejax import config

  mod = importlib.import_module(f"moejax.bench.{args.what}")
  try:
    return mod.main(rest)
  except SystemExit as e:  # a benchmark's `raise SystemExit("message")` is bad input too
    if isinstance(e.code, str):
      raise config.ConfigError(f"bench {args.what}: {e.code}") from None
    raise


def cmd_import_hf(args) -> int:
  from moejax import paths, runs
  from moejax.interop import hf

  paths.in_dir(args.path, "import-hf PATH")
  to = runs.check_destination(paths.out_dir(args.to, "--to"))
  return hf.cli_import(args.path, str(to), args.overrides)


def cmd_merge(args) -> int:
  _start(args)
  from moejax import paths
  from moejax.peft import merge

  # the destination is checked before the merge, which reads and merges the whole model first
  to, step = merge.merge_run(paths.in_dir(args.workdir), paths.out_dir(args.to, "--to"))
  print(f"merged {args.workdir} (step {step}) -> {to}/checkpoints/{step}; export with: moejax export-hf {to} --to DIR")
  return 0


def cmd_export_hf(args) -> int:
  from moejax import paths, runs
  from moejax.interop import hf

  src = paths.in_dir(args.workdir, "export-hf WORKDIR")
  # an export writes config.json and model*.safetensors: never over a run or an earlier export
  to = runs.check_destination(paths.out_dir(args.to, "--to"), "export", source=src, source_is="the run itself")
  return hf.cli_export(args.workdir, str(to), args.arch, dtype=args.dtype)


def cmd_ttmm(args) -> int:
  _start(args)
  from moejax.ttmm import cli as ttmm_cli

  return ttmm_cli.cmd_ttmm(args)


def cmd_generate(args) -> int:
  from moejax.inference import cli as inference_cli

  return inference_cli.cmd_generate(args)


def cmd_prune(args) -> int:
  from moejax.prune import cli as prune_cli

  return prune_cli.run(args)


BENCHES = ("moe", "train", "upcycle", "infer", "peft", "prune", "ttmm")


def build_parser() -> argparse.ArgumentParser:
  p = Parser(prog="moejax", description="Sparse Mixture-of-Experts training in JAX.")
  sub = p.add_subparsers(dest="cmd", required=True)

  e = sub.add_parser("experiments", help="list registered experiments or show one fully resolved")
  e.add_argument("action", choices=["list", "show"])
  e.add_argument("name", nargs="?")
  e.add_argument("overrides", nargs="*", help="a.b.c=value")
  e.set_defaults(fn=cmd_experiments)

  t = sub.add_parser("train", help="train (or resume) an experiment")
  t.add_argument("name", help="registered name, or path/to/file.py:name")
  t.add_argument("overrides", nargs="*", help="a.b.c=value")
  t.add_argument("--workdir", help="default: runs/NAME")
  t.add_argument("--no-progress", action="store_true")
  _add_distributed_flags(t)
  t.set_defaults(fn=cmd_train)

  v = sub.add_parser("eval", help="evaluate the newest checkpoint of a run")
  v.add_argument("name", nargs="?", help="default: the config saved in the workdir")
  v.add_argument("overrides", nargs="*")
  v.add_argument("--workdir", required=True)
  _add_distributed_flags(v)
  v.set_defaults(fn=cmd_eval)

  r = sub.add_parser("report", help="loss curves, expert-load heatmaps and a table from run dirs")
  r.add_argument("dirs", nargs="+")
  r.add_argument("--out")
  r.set_defaults(fn=cmd_report)

  u = sub.add_parser("upcycle", help="dense checkpoint -> MoE checkpoint (sparse upcycling)")
  u.add_argument("--from", dest="source", required=True, help="dense run workdir or checkpoint step dir")
  u.add_argument("--exp", required=True, help="target MoE experiment")
  u.add_argument("overrides", nargs="*")
  u.add_argument("--to", help="workdir to write the MoE checkpoint into (required unless --dry-run)")
  u.add_argument("--dry-run", action="store_true",
                 help="print the plan (which params become experts, which are fresh) and sizes; write nothing")
  _add_distributed_flags(u)
  u.set_defaults(fn=cmd_upcycle)

  from moejax.aot import cli as aot_cli

  aot_cli.add_parser(sub).set_defaults(fn=cmd_compile)

  b = sub.add_parser("bench", help="benchmarks: moe | train | upcycle | infer | peft | prune | ttmm (extra flags go to the benchmark)")
  b.add_argument("what", choices=BENCHES)
  b.set_defaults(fn=None)

  i = sub.add_parser("import-hf", help="Hugging Face safetensors checkpoint -> moejax workdir")
  i.add_argument("path")
  i.add_argument("--to", required=True)
  i.add_argument("overrides", nargs="*")
  i.set_defaults(fn=cmd_import_hf)

  mg = sub.add_parser("merge", help="fold a fine-tuning run's adapters into its base: an ordinary run dir")
  mg.add_argument("--workdir", required=True, help="the fine-tuning run (peft.method lora | spiel_ag | spiel_ma)")
  mg.add_argument("--to", required=True, help="new run dir for the merged model")
  _add_distributed_flags(mg)
  mg.set_defaults(fn=cmd_merge)

  x = sub.add_parser("export-hf", help="moejax workdir -> Hugging Face safetensors checkpoint")
  x.add_argument("workdir")
  x.add_argument("--to", required=True)
  x.add_argument("--arch", default="auto", choices=["auto", "llama", "qwen2", "mixtral", "qwen2_moe", "clip"])
  x.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="tensor dtype on disk")
  x.set_defaults(fn=cmd_export_hf)

  from moejax.inference import cli as inference_cli

  inference_cli.add_parser(sub).set_defaults(fn=cmd_generate)
  from moejax.prune import cli as prune_cli

  prune_cli.add_parser(sub).set_defaults(fn=cmd_prune)
  from moejax.ttmm import cli as ttmm_cli

  ttmm_cli.add_parser(sub, Parser).set_defaults(fn=cmd_ttmm)
  return p


def one_line(e: BaseException) -> str:
  """An error as one line: a message listing problems ("header:\n  - a\n  - b") keeps all of them, joined
  ("header: a; b"), so nothing the user needs is cut off."""
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  if not lines:
    return type(e).__name__
  return " ".join([lines[0], "; ".join(ln.removeprefix("- ").strip() for ln in lines[1:])]).strip()


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(args, the benchmark's own flags). `a.b=v` overrides may come anywhere after the command, before or after
  its flags (`moejax train NAME --workdir DIR train.steps=300`): argparse stops filling a positional list at the
  first flag, so overrides it leaves over are appended to `args.overrides` here."""
  parser = build_parser()
  if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
    # the benchmark owns every flag after its name, --help included
    return parser.parse_args(argv[:2]), argv[2:]
  args, rest = parser.parse_known_args(argv)
  if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
    args.overrides, rest = [*args.overrides, *rest], []
  if rest:
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  return args, []


def _drop_late_read_callbacks() -> None:
  """A checkpoint read that fails part-way (a truncated file) abandons tensorstore reads whose completions later
  reach an asyncio loop orbax has already closed; Python reports each as an "Exception ignored" traceback. They
  carry nothing for the user (the failure itself is reported), so the CLI drops exactly those."""
  default = sys.unraisablehook

  def hook(u):
    e = u.exc_value
    if isinstance(e, RuntimeError) and "Event loop is closed" in str(e):
      return
    default(u)

  if getattr(sys.unraisablehook, "__name__", "") != "hook":
    sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
  args, rest = parse(list(sys.argv[1:] if argv is None else argv))
  _quiet_env()
  _drop_late_read_callbacks()
  try:
    if args.cmd == "bench":
      return cmd_bench(args, rest)
    return args.fn(args)
  except _user_errors() as e:
    print(f"moejax: error: {one_line(e)}", file=sys.stderr)
    return 2
  except ImportError as e:
    if (msg := missing_extra(e)) is None:
      raise
    print(f"moejax: error: {msg}", file=sys.stderr)
    return 2


def console() -> None:
  """The `moejax` console command: `main` in a process with the host allocator settings of a CPU run
  (`moejax/hostmem.py`: it re-executes itself once to get them)."""
  from moejax import hostmem

  hostmem.reexec()
  sys.exit(main())


if __name__ == "__main__":
  console()
