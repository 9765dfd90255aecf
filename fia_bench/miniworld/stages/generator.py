"""The generator stage (the UNet, and the text encoder unless the recipe froze one) and the
export of the finished world in diffusers layout beside its judges."""

from __future__ import annotations

import hashlib
import json
import shutil

import torch
import yaml

from fia_bench.datasets.procedural import world
from fia_bench.miniworld.build_files import flat, load_tensors, nest, save_tensors
from fia_bench.miniworld.loop import compiled
from fia_bench.miniworld.nets import build_text_encoder, build_unet, build_vae, compute_in_fp32
from fia_bench.miniworld.renders import captions_for, training_pool
from fia_bench.miniworld.state import BuildState
from fia_bench.models import SD_SCHEDULER, assemble_pipeline


def train_generator(state: BuildState) -> bool:
    cfg = state.r["generator"]
    frozen = state.frozen_text_encoder()
    unet = build_unet(state.r).to(state.device)
    if frozen is None:
        text_encoder = build_text_encoder(state.r, state.tokenizer).to(state.device)
        trained = {"unet": unet, "text_encoder": text_encoder}
    else:
        text_encoder, trained = frozen, {"unet": unet}
    loop = state.loop("generator", trained)
    forward = compiled(unet, state.device) if state.compile_unet else unet
    latents = state.latents()
    alphas = (
        torch.linspace(SD_SCHEDULER["beta_start"] ** 0.5, SD_SCHEDULER["beta_end"] ** 0.5, 1000)
        ** 2
    )
    alpha_bar = torch.cumprod(1 - alphas, 0)
    snr = alpha_bar / (1 - alpha_bar)
    weight = snr.clamp(max=cfg["min_snr_gamma"]) / snr
    # the judges' "a photo of a ..." captions too: SD-style prompts (Dynamic Mask's "a photo of
    # {concept}", attack prompts) then mean what they say in this world
    templates = [*world(state.world)["captions"], *world(state.world)["judge_captions"]]
    empty = state.token_ids([""])

    pool = training_pool(state.data["subject"], cfg.get("subjects"))

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        idx = pool[torch.randint(len(pool), (cfg["batch_size"],), generator=g)]
        captions, _ = captions_for(state.data, idx.numpy(), templates, g, state.classes)
        ids = state.token_ids(captions)
        drop = torch.rand(len(idx), generator=g) < cfg["drop_caption"]
        ids = torch.where(drop.view(-1, 1), empty, ids)
        t = torch.randint(1000, (len(idx),), generator=g)
        noise = torch.randn(latents[idx].shape, generator=g)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        noisy = (ab.sqrt() * latents[idx] + (1 - ab).sqrt() * noise).to(state.device)
        t, noise, ids = t.to(state.device), noise.to(state.device), ids.to(state.device)
        pred = forward(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        return (weight.to(state.device)[t] * per_sample).mean()

    done = loop.run(
        state.seed, loss_fn, state.limits, warmup=cfg["warmup_steps"], ema_decay=cfg["ema_decay"]
    )
    if not done:
        return False
    final = {"text_encoder": text_encoder.state_dict()}  # frozen: as the text stage left it
    final |= {name: loop.final_state(name) for name in trained}
    save_tensors(state.build / "generator.safetensors", flat(final, "final"))
    return True


def export(state: BuildState) -> bool:
    """Write the pipeline in diffusers layout (fp16 safetensors) and copy the judges, into a
    sibling folder first: the shipped weights are replaced only once the new ones are whole."""
    tokenizer = state.tokenizer
    vae = build_vae(state.r, scaling_factor=state.scaling_factor())
    vae.load_state_dict(load_tensors(state.build / "vae.safetensors")[0])
    trained = nest(load_tensors(state.build / "generator.safetensors")[0], "final")
    unet, text_encoder = build_unet(state.r), build_text_encoder(state.r, tokenizer)
    unet.load_state_dict(trained["unet"])
    text_encoder.load_state_dict(trained["text_encoder"])
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.to(torch.float16)
    out = state.out
    staging = out.parent / f".{out.name}.export"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging / "pipeline", safe_serialization=True)
    compute_in_fp32(staging / "pipeline" / "text_encoder" / "config.json")
    shutil.copytree(state.build / "export" / "clip", staging / "clip")
    shutil.copytree(state.build / "export" / "judges", staging / "classifier")
    # what the model card reports of the training: seconds per stage, summed over chunks
    training = {
        **state.ledger.training(),
        "recipe_sha256": hashlib.sha256(yaml.safe_dump(state.r).encode()).hexdigest(),
    }
    (staging / "training.json").write_text(json.dumps(training, indent=1) + "\n", "utf-8")
    retired = out.parent / f".{out.name}.retired"
    shutil.rmtree(retired, ignore_errors=True)
    if out.exists():
        out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)
    return True
