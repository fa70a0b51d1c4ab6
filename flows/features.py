"""Which features fire here? Token by token, the top active SAE latents of a text.

    atlas features "Mia counts the carp: six, seven" --model toy-a \\
        --hook blocks.1.hook_resid_post [--sae topk-1024-k8] [--k 5]

(or `python -m flows.features ...`), in a project or any folder below it. Loads the
model (`data/models/<model>`), the SAE (`data/saes/<model>/<hook>/<sae>`) and its
dashboard data (`reports/dashboards/<model>/<hook>/<sae>/dashboard_data.json`, for the
descriptions), runs the text up to the hook and prints a table. Without `--sae` it takes
the report's default dashboard SAE (the TopK SAE with the smallest k), or else another
SAE the report built dashboards for. A plain CLI, no Prefect;
`stages.report.features_of_text` is the same thing from Python.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.common import project_root


def resolve_sae(data: Path, reports: Path, model: str, hook: str, sae: str | None) -> Path:
    """The SAE folder to use; errors name the folder that is missing."""
    hook_dir = data / "saes" / model / hook
    if not hook_dir.is_dir():
        have = sorted(p.name for p in (data / "saes" / model).glob("*") if p.is_dir())
        raise FileNotFoundError(
            f"{hook_dir}: missing; expected the saes stage's output for model {model!r} at hook "
            f"{hook!r}"
            + (
                f" (hooks with SAEs: {', '.join(have)})"
                if have
                else f" (run `dvc repro saes@{model}`)"
            )
        )
    if sae is not None:
        folder = hook_dir / sae
        if not (folder / "cfg.json").exists():
            names = sorted(p.name for p in hook_dir.iterdir() if (p / "cfg.json").exists())
            raise FileNotFoundError(
                f"{folder}: no SAE there; SAEs at this hook: {', '.join(names)}"
            )
        return folder
    from stages.report import default_dashboard_saes
    from stages.report.sweep import discover_saes

    refs = [s for s in discover_saes(data / "saes", [model]) if s.hook == hook]
    if not refs:
        raise FileNotFoundError(f"{hook_dir}: holds no SAE folder (cfg.json)")
    default = default_dashboard_saes(refs)[0].path
    dash = reports / "dashboards" / model / hook
    built = sorted(p.parent.name for p in dash.glob("*/dashboard_data.json"))
    if default.name in built or not built:
        return default
    return hook_dir / built[0]


def missing_model(model_dir: Path, model: str) -> FileNotFoundError:
    """Why the model's outputs are missing, from params.yaml when there is one: a model
    it does not define can never be built, one it does needs `dvc repro saes@<model>`
    (which builds the model, its activations and the SAEs this command needs)."""
    from stages.config import ParamsError, load_params

    try:
        params = project_root() / "params.yaml"
        models = sorted(load_params(params).models)
    except (FileNotFoundError, ParamsError):  # no project or bad params: say what we can
        models = None
    if models is not None and model not in models:
        return FileNotFoundError(
            f"model {model!r} is not in {params} (models there: {', '.join(models)}); "
            f"--model must name one of them ({model_dir}: missing)"
        )
    return FileNotFoundError(
        f"{model_dir}: missing; expected the lm stage's output for model {model!r} "
        f"(run `dvc repro saes@{model}`: this command needs the model's SAEs too)"
    )


def _not_utf8(text: str) -> str | None:
    """Why `text` is not UTF-8, or None. Python hands over command-line bytes that are not
    UTF-8 as lone surrogates, which the tokenizer refused with a TypeError traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
        what = f"byte {byte:#04x}" if byte is not None else f"character {text[e.start]!a}"
        return (f"the text is not valid UTF-8 ({what} at character {e.start}); "
                "expected UTF-8 text (e.g. `iconv -f latin1 -t utf-8`)")  # fmt: skip
    return None


def main(argv: list[str] | None = None, prog: str = "python -m flows.features") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Print, token by token, the top active SAE features of a text.",
    )
    ap.add_argument("text", help="the text to analyse")
    ap.add_argument("--model", required=True, help="model name, e.g. toy-a")
    ap.add_argument("--hook", required=True, help="hook name, e.g. blocks.1.hook_resid_post")
    ap.add_argument(
        "--sae", help="SAE name under data/saes/<model>/<hook>/ (default: the dashboarded one)"
    )
    ap.add_argument("--k", type=int, default=5, help="features per token (default 5)")
    ap.add_argument("--data", type=Path, help="pipeline data folder (default: the project's data/)")
    ap.add_argument("--reports", type=Path, help="report folder (default: the project's reports/)")
    args = ap.parse_args(argv)
    if bad := _not_utf8(args.text):
        print(f"error: {bad}", file=sys.stderr)
        return 2
    try:
        if args.data is None or args.reports is None:
            root = project_root()
            args.data = args.data or root / "data"
            args.reports = args.reports or root / "reports"
        from stages.models import load_model
        from stages.report import features_of_text, format_token_features, load_dashboard_data
        from stages.sae import load_sae

        model_dir = args.data / "models" / args.model
        if not (model_dir / "config.json").exists():
            raise missing_model(model_dir, args.model)
        folder = resolve_sae(args.data, args.reports, args.model, args.hook, args.sae)
        dash_path = (
            args.reports
            / "dashboards"
            / args.model
            / args.hook
            / folder.name
            / "dashboard_data.json"
        )
        dashboard = load_dashboard_data(dash_path) if dash_path.exists() else None
        model = load_model(model_dir)
        sae = load_sae(folder)
        rows = features_of_text(args.text, model, args.hook, sae, dashboard, k=args.k)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError, ConnectionError) as e:
        # (RuntimeError: a pretrained model that neither the hub nor the HF cache has)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    from stages.report.dashboards import pretrained_source

    src = pretrained_source(sae)  # a published SAE (saes.pretrained): say which
    print(f"{args.model} · {args.hook} · {folder.name}"
          + (f" (published: {src})" if src else "")
          + f": top {args.k} active features per token")  # fmt: skip
    n_ctx = model.cfg.n_ctx
    if len(rows) > n_ctx - 1:  # said, not silent: the text is longer than the context
        print(f"(the text's {len(rows)} tokens exceed the context of {n_ctx}: read in "
              f"{-(-len(rows) // (n_ctx - 1))} windows of {n_ctx - 1} tokens, each starting "
              "again from BOS, as the pipeline caches text)")  # fmt: skip
    if dashboard is None:
        print(f"(no descriptions: {dash_path} is missing; build the report for them)")
    print(format_token_features(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
