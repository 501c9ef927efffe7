"""`flashbench convert`: convert an HF checkpoint to a flash directory."""

from __future__ import annotations

from flashbench import suite
from flashbench.reference.layout import DTYPES, LAYOUTS

from .common import EXIT_OK, UsageError, add_pruning_args, pruning_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert an HF checkpoint to a flash directory",
                       description="Convert an HF checkpoint (config.json + safetensors) to a flash directory: "
                       "resident.safetensors, one FFN file per layer, layout.json. Streams one tensor at a time.")
    p.add_argument("checkpoint", help="embedded model name or HF checkpoint dir")
    p.add_argument("out", help="the flash directory to create (must not exist)")
    p.add_argument("--layout", choices=LAYOUTS, default="bundled",
                   help="bundled: one record per neuron (default); unbundled: one region per matrix")
    p.add_argument("--storage-dtype", "--dtype", choices=DTYPES, default="float16",
                   help="how the FFN weights are stored (default float16; int8 has per-neuron symmetric scales)")
    add_pruning_args(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from flashbench.reference.layout import convert

    source = suite.model_path(args.checkpoint)
    if not source.is_dir():
        raise UsageError(f"{source}: no such checkpoint directory")
    keep, pruning = pruning_from_args(source, args)

    def progress(done: int, total: int) -> None:
        print(f"\r  layer {done}/{total}", end="\n" if done == total else "", flush=True)

    print(f"converting {source} -> {args.out} ({args.layout}, {args.storage_dtype})")
    flash = convert(source, args.out, layout=args.layout, dtype=args.storage_dtype, progress=progress, keep=keep,
                    pruning=pruning)
    g = flash.geometry
    ffn = sum(flash.geometry_of(i).file_bytes for i in range(flash.config.n_layers))
    total = sum(f["bytes"] for f in flash.files.values())
    print(f"wrote {flash.path}: {flash.config.n_layers} FFN files, {ffn:,} bytes"
          f"{' (dead neurons pruned)' if flash.kept is not None else ''}; record {g.record_bytes:,} bytes "
          f"({'+'.join(g.vectors)}); {total / 2**20:.1f} MiB in all")
    return EXIT_OK
