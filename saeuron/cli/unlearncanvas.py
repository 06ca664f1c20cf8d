"""``saeuron unlearncanvas generate|classify|report``: the UnlearnCanvas benchmark on local files, one
command per stage."""
from __future__ import annotations

from pathlib import Path

from ..pipelines import load_pipeline
from .common import add_edit_args, patch_kwargs, torch_device, torch_dtype


def cmd_unlearncanvas_generate(a):
    """``saeuron unlearncanvas generate``: create/check the run config, then write every missing image."""
    from ..evaluate.unlearncanvas import generate_images, init_run

    cfg = init_run(a.run, model=a.model, checkpoint=a.checkpoint, labels=a.labels, domain=a.domain,
                   targets=a.targets, seeds=a.seeds, steps=a.steps, guidance=a.guidance, height=a.height,
                   width=a.width, **patch_kwargs(a))
    written = generate_images(a.run, lambda: load_pipeline(cfg["model"], a.device, torch_dtype(a.dtype)),
                              targets=a.targets, original=a.original, batch_size=a.batch_size, progress=not a.quiet)
    print(f"{sum(written.values())} images written in {Path(a.run) / 'images'} ({len(written)} folders; "
          "existing images kept)")


def cmd_unlearncanvas_classify(a):
    """``saeuron unlearncanvas classify``: predictions of the style and object classifiers, per target."""
    from ..evaluate.unlearncanvas import classify_run

    status = classify_run(a.run, a.arch, classifier=a.classifier, style_classifier=a.style_classifier,
                          object_classifier=a.object_classifier, device=torch_device(a.device), batch_size=a.batch_size,
                          image_size=a.image_size, progress=not a.quiet)
    for folder, st in status.items():
        print(f"{folder}: {st}")


def cmd_unlearncanvas_report(a):
    """``saeuron unlearncanvas report``: the UA/IRA/CRA table (results.json, results.md)."""
    from ..evaluate.unlearncanvas import report

    report(a.run, progress=not a.quiet)
    print(f"results: {Path(a.run) / 'results.json'} and results.md")


def add_unlearncanvas_parser(sub):
    """``saeuron unlearncanvas generate|classify|report``: UnlearnCanvas on local files, one command per stage."""
    uc = sub.add_parser("unlearncanvas", help="the UnlearnCanvas protocol on a local model and classifiers, by stage")
    ucs = uc.add_subparsers(dest="unlearncanvas_cmd", required=True)
    s = ucs.add_parser("generate", help="images of every prompt x seed with each target unlearned (resumes)")
    s.add_argument("--run", required=True, help="run folder (config.json, images/, predictions/, results)")
    s.add_argument("--model", default=None, help="UnlearnCanvas SD1.5 pipeline folder (new runs)")
    s.add_argument("--checkpoint", default=None, help="SAeUron checkpoint: SAEs + concept file (new runs)")
    s.add_argument("--labels", default=None, help='JSON {"styles": [...], "objects": [...], "template": "..."} '
                                                  "in classifier class order (default: built-in lists)")
    s.add_argument("--domain", default=None, choices=["style", "object"], help="what is unlearned (default style)")
    s.add_argument("--targets", nargs="+", default=None, help="targets to generate (default: all of the run)")
    s.add_argument("--seeds", type=int, nargs="+", default=None, help="default 188 288 588 688 888")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default 100)")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default 9.0)")
    s.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    s.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    add_edit_args(s)
    s.add_argument("--original", action="store_true", help="also the unedited model's images (images/_original)")
    s.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as saved)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_unlearncanvas_generate)

    s = ucs.add_parser("classify", help="style and object predictions for every complete target (resumes)")
    s.add_argument("--run", required=True, help='run folder (config.json, images/, predictions/, results)')
    s.add_argument("--arch", default="vit_large_patch16_224", choices=["vit_large_patch16_224", "minicanvas"],
                   help="classifier architecture (vit_large_patch16_224 needs timm; minicanvas: SmallCNN stand-ins)")
    s.add_argument("--classifier", default=None, help="one file, shared body + style_head.* and object_head.*")
    s.add_argument("--style-classifier", default=None, help="style classifier file (.pth/.pt/.safetensors)")
    s.add_argument("--object-classifier", default=None, help="object classifier file (.pth/.pt/.safetensors)")
    s.add_argument("--image-size", type=int, default=None, help="classifier input size (default: per --arch)")
    s.add_argument("--batch-size", type=int, default=32, help='items per batch (default %(default)s)')
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_unlearncanvas_classify)

    s = ucs.add_parser("report", help="UA / IRA / CRA per target and their mean: results.json + results.md")
    s.add_argument("--run", required=True, help='run folder (config.json, images/, predictions/, results)')
    s.add_argument("--quiet", action="store_true", help="do not print the table")
    s.set_defaults(fn=cmd_unlearncanvas_report)
    return uc
