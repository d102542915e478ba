r"""One command per row of a paper table: print them, or run them one after another.

  python -m ddae_jax.sweep --table=table3 --workdir_root=gs://BUCKET/ablations
  python -m ddae_jax.sweep --table=table3 --workdir_root=/runs --run -- --config.data.data_dir=...

Without --run it prints one `python -m ddae_jax.main ...` line per row (a sweep
list to hand to a launcher, e.g. each line's --config to `launch/tpu.py run`);
with --run it trains the rows in turn, each in its own workdir
`<workdir_root>/<table>/<row config>`, so rerunning resumes the unfinished one.
Arguments after `--` are passed to every run. Tables: see ablations.TABLES.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys

from ddae_jax.ablations import TABLES


def row_workdir(root: str, table: str, config_arg: str) -> str:
  """`root/table/<config file stem>-<variants>`, e.g. gs://b/table3/mae_vits-dds_mae."""
  path, _, variants = config_arg.partition(":")
  stem = path.rsplit("/", 1)[-1].removesuffix(".py")
  name = stem + ("-" + variants.replace(",", "-") if variants else "")
  return f"{root.rstrip('/')}/{table}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


def commands(table: str, workdir_root: str, extra: list[str] = ()) -> list[list[str]]:
  """argv of every row's training run, in the table's order."""
  if table not in TABLES:
    raise SystemExit(f"error: --table={table!r}: allowed {sorted(TABLES)}")
  return [[sys.executable, "-m", "ddae_jax.main", f"--config={arg}",
           f"--workdir={row_workdir(workdir_root, table, arg)}", *extra]
          for _, arg, _ in TABLES[table]]


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--table", required=True, choices=sorted(TABLES))
  parser.add_argument("--workdir_root", required=True)
  parser.add_argument("--run", action="store_true", help="train the rows one after another")
  args = parser.parse_args(argv)
  rows = TABLES[args.table]
  for (row, _, top1), cmd in zip(rows, commands(args.table, args.workdir_root, extra),
                                 strict=True):
    print(f"# {args.table}: {row} (paper: {top1} top-1)")
    print(shlex.join(cmd), flush=True)
    if args.run and subprocess.run(cmd).returncode:
      return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
