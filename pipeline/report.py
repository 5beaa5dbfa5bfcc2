"""The evaluation's one-page HTML report (``report.html``) with its per-organ and codebook plots."""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["LABELS", "fmt_value", "write_report"]


def fmt_value(v: Any, digits: int = 4) -> str:
    """A value as the report prints it: ``digits`` significant digits, "–" when missing, HTML-escaped text."""
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return html.escape(str(v))


#: report labels: key -> (label with unit, short column heading, scale)
LABELS = {
    "psnr_body": ("PSNR inside the body (dB)", "PSNR body<br>dB", 1),
    "ssim_body": ("SSIM inside the body (0-1)", "SSIM body", 1),
    "psnr": ("PSNR over the whole cube (dB)", "PSNR cube<br>dB", 1),
    "ssim": ("SSIM over the whole cube (0-1)", "SSIM cube", 1),
    "mae_hu_body": ("Mean absolute error inside the body (HU)", "MAE<br>HU", 1),
    "rmse_hu_body": ("Root mean square error inside the body (HU)", "RMSE<br>HU", 1),
    "tokens": ("Tokens", "tokens", 1),
    "tokens_per_scan": ("Tokens per scan (mean)", "tokens", 1),
    "codes_used": ("Codes used", "codes<br>used", 1),
    "codebook_usage": ("Share of the codebook used (%)", "codebook %", 100),
    "perplexity": ("Codebook perplexity (effective number of codes)", "perplexity", 1),
    "support_voxels": ("Voxels encoded (body, inside the window)", "voxels", 1),
    "body_voxels": ("Body voxels", "body voxels", 1),
    "encode_s": ("Encode time per scan (s)", "encode<br>s", 1),
    "decode_s": ("Decode time per scan (s)", "decode<br>s", 1),
    "encode_peak_mb": ("Peak memory while encoding (MB)", "encode<br>MB", 1),
    "decode_peak_mb": ("Peak memory while decoding (MB)", "decode<br>MB", 1),
}


def _short_path(path: Any, base: Path) -> str:
    """``path`` relative to the report folder when close by, else its last three parts: no machine paths."""
    if not path:
        return ""
    p = Path(str(path))
    try:
        rel = os.path.relpath(p.resolve(), base.resolve())
    except ValueError:  # another drive
        rel = str(p)
    if not os.path.isabs(rel) and rel.count("..") <= 2:
        return rel
    return "…/" + "/".join(p.parts[-3:])


def _plots(out: Path, summary: Mapping) -> dict[str, str]:
    """Per-organ MAE and codebook-usage plots (PNG beside the report); returns {name: relative path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io_utils import atomic_path

    made = {}
    organs = {k: v for k, v in (summary.get("organ_mae_hu") or {}).items() if v is not None}
    plots = []
    if organs:
        plots.append(("organ_mae.png", "organs"))
    if summary.get("code_counts"):
        plots.append(("codebook_usage.png", "codes"))
    for name, kind in plots:
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
        if kind == "organs":
            names = sorted(organs, key=organs.get)
            ax.barh(names, [organs[k] for k in names], color="#4a7fb5")
            ax.set_xlabel("MAE inside the organ (HU), mean over cases")
            ax.set_title("Reconstruction error per organ")
        else:
            levels = summary.get("code_counts_per_level") or [summary["code_counts"]]
            for d, level in enumerate(levels, 1):
                counts = sorted(level, reverse=True)
                used = sum(1 for c in counts if c)
                if len(levels) == 1:
                    ax.bar(range(1, len(counts) + 1), counts, width=1.0, color="#b5744a")
                    ax.set_title(f"Codebook usage: {used} of {len(counts)} codes used")
                else:
                    ax.step(range(1, len(counts) + 1), counts, where="mid", label=f"level {d}: {used} of {len(counts)} used")
            if len(levels) > 1:
                ax.legend(fontsize=8)
                ax.set_title(f"Codebook usage of each of the {len(levels)} residual levels")
            ax.set_yscale("symlog")
            ax.set_xlabel(f"code rank (codebook of {len(levels[0])})")
            ax.set_ylabel("tokens using the code")
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        made[kind] = name
    return made


def write_report(out: str | os.PathLike, summary: Mapping) -> Path:
    """One-page ``report.html``: overall metrics with units, per-case table (cases used in training marked),
    per-organ MAE and codebook-usage plots, and the three-plane pictures (click for full size).

    Args:
        out: report folder (pictures and plots are referenced relative to it).
        summary: the evaluation summary.
    """
    from pipeline.io_utils import save_text

    out = Path(out)
    w = summary["window"]
    ov = summary["overall"]
    trained = summary.get("training_cases")
    trained_set = set(trained or [])
    plots = _plots(out, summary)
    css = (
        "body{font-family:sans-serif;margin:1.5em auto;max-width:1180px;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee;font-weight:normal}"
        "td:first-child,th:first-child{text-align:left}tr.train td{background:#fff6e0}"
        ".wide{overflow-x:auto;max-width:100%}img{max-width:100%;height:auto;display:block}"
        "figure{margin:1em 0}figcaption{font-size:0.9em;color:#555}.note{font-size:0.9em;color:#555}"
    )
    def esc(v: Any) -> str:
        return html.escape(str(v))

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>CT tokenizer evaluation</title>",
        f"<meta name='viewport' content='width=device-width'><style>{css}</style></head><body>",
        "<h1>CT tokenizer evaluation</h1>",
        f"<p>Model: <code>{esc(_short_path(summary['model'], out))}</code><br>"
        f"Data: <code>{esc(_short_path(summary['data_dir'], out))}</code>, {summary['num_cases']} whole scans, "
        f"resampled to {summary['resolution']}<sup>3</sup> voxels<br>"
        f"Window: {esc(w['name'])} (width {w['width']:g} HU, level {w['level']:g} HU); run on {esc(summary['device'])}</p>",
        "<h2>Overall</h2><table><tr><th>measure</th><th>value</th></tr>",
    ]
    for k, v in ov.items():
        label, _, scale = LABELS.get(k, (k, k, 1))
        if k == "codes_used":
            label = f"Codes used (of {summary['num_embeddings']})"
        parts.append(f"<tr><td>{esc(label)}</td><td>{fmt_value(v * scale if isinstance(v, (int, float)) else v)}</td></tr>")
    parts.append("</table>")
    parts.append(
        "<p class='note'>PSNR and SSIM compare the window values (0 to 1) of input and reconstruction; "
        "\"body\" means inside the body mask, \"cube\" the whole resampled volume. MAE and RMSE are in HU inside "
        "the body, within the window's HU range. Higher PSNR and SSIM and lower errors are better.</p>"
    )
    cols = ["psnr_body", "ssim_body", "mae_hu_body", "rmse_hu_body", "tokens", "codes_used", "encode_s", "decode_s",
            "encode_peak_mb"]
    datasets = {r.get("dataset") for r in summary["cases"]}
    parts.append("<h2>Cases</h2>")
    if trained is None:
        parts.append("<p class='note'>Which cases the model was trained on is not known (no <code>cases.json</code> "
                     "beside the checkpoint's run).</p>")
    else:
        n_tr = sum(1 for r in summary["cases"] if r["case"] in trained_set)
        parts.append(f"<p class='note'>{n_tr} of {len(summary['cases'])} cases were used in training (shaded, "
                     "marked <b>T</b>): their numbers say how well the model fits, not how well it generalises.</p>")
    parts.append("<div class='wide'><table><tr><th>case</th><th>T</th>"
                 + "".join(f"<th>{LABELS[c][1]}</th>" for c in cols) + "</tr>")
    for r in summary["cases"]:
        name = r.get("case_id") if len(datasets) == 1 and r.get("case_id") else r["case"]
        tr = r["case"] in trained_set
        parts.append(f"<tr{' class=train' if tr else ''}><td title='{esc(r['case'])}'>{esc(name)}</td>"
                     f"<td>{'T' if tr else ''}</td>" + "".join(f"<td>{fmt_value(r.get(c), 3)}</td>" for c in cols) + "</tr>")
    parts.append("</table></div>")
    if len(datasets) == 1:
        parts.append(f"<p class='note'>All cases from the dataset <code>{esc(next(iter(datasets)))}</code>.</p>")
    if summary.get("organ_mae_hu"):
        parts.append("<h2>Error per organ</h2>")
        if "organs" in plots:
            parts.append(f"<img src='{plots['organs']}' alt='MAE per organ' style='width:760px'>")
        parts.append("<table><tr><th>organ</th><th>MAE, HU</th></tr>")
        for k, v in summary["organ_mae_hu"].items():
            parts.append(f"<tr><td>{esc(k)}</td><td>{fmt_value(v, 3)}</td></tr>")
        parts.append("</table>")
    if "codes" in plots:
        parts.append(f"<h2>Codebook usage</h2><img src='{plots['codes']}' alt='codebook usage' style='width:760px'>")
    pics = [r for r in summary["cases"] if r.get("picture")]
    if pics:
        parts.append("<h2>Pictures</h2><p class='note'>Rows: axial, coronal, sagittal; columns: input, "
                     "reconstruction, error (reconstruction minus input). Click a picture for full size.</p>")
        for r in pics:
            pic = esc(r["picture"])
            mark = " (used in training)" if r["case"] in trained_set else ""
            parts.append(f"<figure><a href='{pic}'><img src='{pic}' alt='{esc(r['case'])}'></a>"
                         f"<figcaption>{esc(r['case'])}{mark}</figcaption></figure>")
    parts.append("</body></html>\n")
    return save_text(out / "report.html", "\n".join(parts))
