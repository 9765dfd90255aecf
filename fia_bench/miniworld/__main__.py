"""``python -m fia_bench.miniworld train|evaluate|sublayers|judges|text-rows``: build the mini
world, measure its card, or measure a build in progress."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fia_bench.miniworld.build_files import STAGES
from fia_bench.miniworld.train import Builder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fia_bench.miniworld")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume training of) the mini world")
    train.add_argument("--build", type=Path, default=Path(".mini_world_build"))
    train.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    train.add_argument(
        "--max-minutes",
        type=float,
        default=float("inf"),
        help="stop after this long and resume on the next call",
    )
    train.add_argument(
        "--max-steps",
        type=int,
        default=2**62,
        help="stop each stage after this many steps in this call (a timing burst)",
    )
    train.add_argument("--recipe", type=Path, default=None, help="another recipe.yaml")
    train.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to train (default: cuda when there is one)",
    )
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to export (default: the package's miniworld/weights)",
    )
    train.add_argument(
        "--compile",
        action="store_true",
        help="train the generator's UNet through torch.compile (CUDA graphs on a GPU)",
    )
    card = sub.add_parser("evaluate", help="measure the model card of the shipped mini world")
    card.add_argument("--out", type=Path, default=Path("docs/mini_world_card.json"))
    card.add_argument(
        "--doc", type=Path, default=Path("docs/mini_world.md"), help="the card to fill in"
    )
    card.add_argument("--images-per-prompt", type=int, default=8)
    card.add_argument("--fid-images", type=int, default=1000)
    card.add_argument(
        "--ablation-images-per-prompt",
        type=int,
        default=2,
        help="images per object prompt for each sublayer family zeroed",
    )
    card.add_argument("overrides", nargs="*", help="config overrides, e.g. sampler.steps=20")
    layers = sub.add_parser(
        "sublayers",
        help="object accuracy with each edited sublayer family zeroed, on the shipped weights "
        "or on a build's generator as it stands",
    )
    layers.add_argument("--build", type=Path, default=None, help="a build directory")
    layers.add_argument("--images-per-prompt", type=int, default=2)
    layers.add_argument("--objects", type=int, default=None, help="only the first N objects")
    layers.add_argument("--recipe", type=Path, default=None, help="the build's recipe.yaml")
    layers.add_argument("--out", type=Path, default=None, help="also write the figures here")
    layers.add_argument(
        "--per-module",
        action="store_true",
        help="also zero FFN2 and the cross-attention values one transformer module at a time",
    )
    uce = sub.add_parser(
        "uce",
        help="the card's UCE check (each of the first ten objects erased alone), on the shipped "
        "weights or on a build's generator as it stands",
    )
    uce.add_argument("--build", type=Path, default=None, help="a build directory")
    uce.add_argument("--recipe", type=Path, default=None, help="the build's recipe.yaml")
    uce.add_argument("--images-per-prompt", type=int, default=8, help="the card's is 8")
    uce.add_argument("--out", type=Path, default=None, help="also write the figures here")
    uce.add_argument("overrides", nargs="*", help="e.g. method.settings.variant=lasttoken")
    upstream = sub.add_parser(
        "judges",
        help="a build's VAE (PSNR) and judges (accuracy on held-out renders of its world) as "
        "they stand",
    )
    upstream.add_argument("--build", type=Path, default=Path(".mini_world_build"))
    upstream.add_argument("--recipe", type=Path, default=None, help="the build's recipe.yaml")
    rows = sub.add_parser(
        "text-rows",
        help="how alike the text encoder's word and padding rows are for the same and for other "
        "objects (what UCE's edit reaches)",
    )
    rows.add_argument("--pipeline", type=Path, default=None, help="a diffusers pipeline folder")
    rows.add_argument(
        "--clip", type=Path, default=None, help="an open_clip folder: measure its text tower"
    )
    rows.add_argument(
        "--build", type=Path, default=None, help="a build whose text stage has finished"
    )
    rows.add_argument("--recipe", type=Path, default=None, help="the build's recipe.yaml")
    args = parser.parse_args(argv)
    if args.command == "train":
        finished = Builder(
            args.build,
            out=args.out,
            recipe_path=args.recipe,
            max_minutes=args.max_minutes,
            max_steps=args.max_steps,
            device=args.device,
            compile_unet=args.compile,
        ).run(args.stages)
        print("[mini-world] done" if finished else "[mini-world] paused")
    elif args.command == "judges":
        from fia_bench.miniworld.card import build_upstream

        print(json.dumps(build_upstream(args.build, args.recipe), indent=1))
    elif args.command == "text-rows":
        from fia_bench.miniworld.text_rows import measure as text_rows

        print(json.dumps(text_rows(args.pipeline, args.clip, args.build, args.recipe), indent=1))
    elif args.command in ("sublayers", "uce"):
        from fia_bench.miniworld.card import sublayers, uce_on_build

        if args.command == "sublayers":
            result = sublayers(
                args.build,
                args.images_per_prompt,
                args.objects,
                args.recipe,
                per_module=args.per_module,
            )
        else:
            result = uce_on_build(args.build, args.images_per_prompt, args.recipe, args.overrides)
        text = json.dumps(result, indent=1)
        if args.out:
            args.out.write_text(text + "\n", encoding="utf-8")
        print(text)
    else:
        from fia_bench.miniworld.build_files import weights_dir
        from fia_bench.miniworld.card import measure, write_card

        result = measure(
            args.images_per_prompt,
            args.fid_images,
            args.overrides,
            args.ablation_images_per_prompt,
        )
        training = json.loads((weights_dir() / "training.json").read_text(encoding="utf-8"))
        write_card(result, args.out, args.doc, training)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
