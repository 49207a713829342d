"""`tformer adapter`: what to do with a LoRA run's adapters (a run trained with `model.lora`).

    tformer adapter RUN --merge --out DIR          a plain run, adapters folded into the weights
    tformer adapter RUN --save --out DIR [--peft]  the adapters (and head) alone; --peft: peft's
                                                   adapter_config.json + adapter_model.safetensors
    tformer adapter BASE --load ADAPTERS --out DIR the base run with saved adapters (tformer's or
                                                   peft's) as a LoRA run

--out is always a new or empty folder: nothing is overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_adapter_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapter", help="a LoRA run's adapters: merge them into a plain run, save them alone "
                       "(tformer's or peft's format), or load saved ones onto a base run")
    p.add_argument("run_dir", help="a LoRA run (--merge, --save) or the base run (--load)")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--merge", action="store_true", help="write a plain run with the adapters merged")
    action.add_argument("--save", action="store_true", help="write the adapters and the task head alone")
    action.add_argument("--load", metavar="ADAPTERS", default=None, help="a folder --save wrote (either "
                        "format): write RUN_DIR with these adapters as a LoRA run")
    p.add_argument("--peft", action="store_true", help="--save: peft's format, for transformers' twin of the "
                   "model (GPT-2, BERT)")
    p.add_argument("--out", required=True, help="a new or empty folder to write into")
    p.set_defaults(func=cmd_adapter)


def cmd_adapter(args: argparse.Namespace) -> int:
    from tformer.compress import lora as compress_lora
    from tformer.compress.output import check_new_folder

    if args.peft and not args.save:
        raise ValueError("--peft goes with --save (--load reads either format by itself)")
    out = check_new_folder(args.out)
    if args.load is not None and not Path(args.load).expanduser().exists():
        raise FileNotFoundError(f"--load {args.load} does not exist; give a folder `tformer adapter RUN --save` "
                                "wrote (tformer's or peft's format)")
    if args.merge:
        compress_lora.merge_lora(args.run_dir, out)
        print(f"wrote the merged plain run {out}", file=sys.stderr)
    elif args.save and args.peft:
        _save_peft(args.run_dir, out)
    elif args.save:
        compress_lora.save_adapters(args.run_dir, out)
        print(f"wrote the adapters of {args.run_dir} to {out}", file=sys.stderr)
    elif (Path(args.load).expanduser() / compress_lora.ADAPTER_CONFIG).is_file():
        compress_lora.attach_adapters(args.run_dir, args.load, out)
        print(f"wrote {args.run_dir} with the adapters of {args.load} as the LoRA run {out}", file=sys.stderr)
    else:
        _load_peft(args.run_dir, args.load, out)
    return 0


def _save_peft(run_dir: str, out: Path) -> None:
    from tformer.compress.lora import lora_edit
    from tformer.interop.peft import write_peft
    from tformer.runs import open_run

    run = open_run(run_dir)
    lora_edit(run)  # a run without adapters: one line
    base = run.record.get("init_from")
    write_peft(run.model, out, base_model=str(base) if base else None)
    print(f"wrote the adapters of {run_dir} in peft's format to {out}", file=sys.stderr)


def _load_peft(base_dir: str, folder: str, out: Path) -> None:
    from tformer.compress.lora import ADAPTERS_KEY
    from tformer.compress.output import write_run
    from tformer.interop.peft import read_peft
    from tformer.runs import open_run

    base = open_run(base_dir)
    model = read_peft(folder, base.model)
    write_run(model, base, out, extra_keys={ADAPTERS_KEY: str(Path(folder).expanduser().resolve())})
    print(f"wrote {base_dir} with the peft adapters of {folder} as the LoRA run {out}", file=sys.stderr)
