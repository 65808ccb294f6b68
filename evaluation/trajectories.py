"""Latent reasoning trajectories (the paper's Appendix H): where the Reasoner's per-token latent moves while a
response is read, for a few users, projected jointly to 2-D.

    python -m evaluation.trajectories --model checkpoints/flythinker/tiny/final \
        --data data/product_review/val.parquet --out outputs/trajectories --users 4 --samples-per-user 3

`--model` is a FlyThinker checkpoint (flythinker.json, loaded with its stored lam/projection) or a folder
holding generator/ and reasoner/ HF folders (loaded with `load_flythinker`, `--lam`).

What is plotted. Each sample is teacher-forced on prompt + its reference response exactly as training
tokenises it (chat-templated prompt, response + EOS, same truncation rule as recipe.data.SFTDataset).
The reasoner reads the whole sequence once; we keep r_t for every position t whose token x_t is a
RESPONSE token, i.e. the latent the reasoner emits after reading x_t, which fuses into x_{t+1}.
`--latent rescaled` (default) is what the generator receives: fit(r_t) with r_t = s * h_t / ||h_t||
(model.latents with s = embedding_scale(generator)); with `projection: pad` the zero padding is dropped,
so the vectors are r_t in d_R with norm s; with `projection: linear` they are the projected d_G vectors.
`--latent raw` is the reasoner's final-norm state h_t itself. All points of all users are projected
jointly (PCA, or t-SNE) so the users share one 2-D frame.

Direction fit (`--fit lsq`, default): within each sample the 2-D coordinates y(p) are regressed on the
token position p (p = 0.. within the response), with a per-sample intercept (both centred per sample),
pooled over the user's samples: slope b = sum_s p_s . y_s / sum_s p_s . p_s, direction b / ||b||. It is
oriented (points the way the latent moves as the response proceeds). `--fit pca` instead takes the first
principal axis of the user's per-sample-centred points, oriented to increase with p. Reported per user:
unit direction, angle (degrees, atan2), speed (2-D units per token along the direction), r2 (share of
the within-sample 2-D variance explained by linear motion along the slope), sample_consistency (length
of the mean of the per-sample unit directions: 1 = every sample moves the same way, ~0 = no agreement).
Across users: resultant length of the user directions (1 = all users move alike) and pairwise angles.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from flythinker_worker.model import CONFIG_NAME, FlyThinker, Projection, embedding_scale, hidden_size
from flythinker_worker.utils import DTYPES, write_json_atomic
from recipe.data import conversation, prompt_ids, response_ids

logger = logging.getLogger(__name__)
NO_LATENTS = "no reasoner latents to plot"
LATENTS, METHODS, FITS = ("rescaled", "raw"), ("pca", "tsne"), ("lsq", "pca")


# ---- model and data --------------------------------------------------------------------------------------

def load_model(path: str, lam: float = 0.5, dtype: torch.dtype = torch.float32):
    """(FlyThinker, tokenizer) from a FlyThinker checkpoint or a folder with generator/ + reasoner/."""
    from transformers import AutoTokenizer

    from flythinker_worker.loading import load_flythinker

    root = Path(path)
    if (root / CONFIG_NAME).exists():
        model = FlyThinker.from_pretrained(root, dtype=dtype)
        tok_dir = root if (root / "tokenizer_config.json").exists() else root / "generator"
        return model, AutoTokenizer.from_pretrained(str(tok_dir))
    if (root / "generator").is_dir():
        reasoner = root / "reasoner"
        return load_flythinker(str(root / "generator"), str(reasoner) if reasoner.is_dir() else None, lam=lam,
                               positions="global", projection="pad", dtype=dtype)
    raise FileNotFoundError(f"{root} is neither a FlyThinker checkpoint (no {CONFIG_NAME}) nor a folder "
                            "holding generator/ and reasoner/")


def select_rows(frame: pd.DataFrame, users: int, samples_per_user: int, seed: int = 0,
                source: str = "data") -> list[dict]:
    """`samples_per_user` rows of each of `users` users (seeded choice; users with enough samples first)."""
    if "user_id" not in frame.columns:
        raise ValueError(f"{source} has no user_id column (columns: {', '.join(frame.columns)})")
    order = list(dict.fromkeys(frame["user_id"]))  # distinct users, first-appearance order
    if len(order) < users:
        raise ValueError(f"{source} has only {len(order)} distinct users, but --users {users} were asked for")
    rng = np.random.default_rng(seed)
    order = [order[i] for i in rng.permutation(len(order))]
    counts = frame["user_id"].value_counts()
    chosen = ([u for u in order if counts[u] >= samples_per_user]
              + [u for u in order if counts[u] < samples_per_user])[:users]
    rows = []
    for user in chosen:
        index = np.flatnonzero((frame["user_id"] == user).to_numpy())
        if len(index) < samples_per_user:
            logger.warning("user %s has only %d samples (asked for %d): using all", user, len(index),
                           samples_per_user)
        pick = np.sort(rng.choice(index, size=min(samples_per_user, len(index)), replace=False))
        for i in pick:
            row = frame.iloc[int(i)].to_dict()
            row["_source"] = (source, int(i))
            rows.append(row)
    return rows


def tokenize_row(tokenizer, row: dict, max_prompt_length: int, max_response_length: int):
    """(prompt ids, response ids) exactly as recipe.data.SFTDataset builds them for training; a row with
    only `prompt` + `reference` (an eval file) is teacher-forced on its reference."""
    if row.get("messages") is None and "response" not in row and "reference" in row:
        row = {**row, "response": row["reference"]}
    messages = conversation(row)
    prompt, _ = prompt_ids(tokenizer, messages[:-1], max_prompt_length)
    response, _ = response_ids(tokenizer, messages[-1]["content"], max_response_length)
    return prompt, response


@torch.no_grad()
def collect_latents(model: FlyThinker, tokenizer, rows: list[dict], latent: str = "rescaled",
                    max_prompt_length: int = 2048, max_response_length: int = 1024,
                    device: str | torch.device = "cpu") -> dict[str, list[np.ndarray]]:
    """Per user (insertion order), one float32 array (n_response_tokens, d) per sample, rows in token order.
    Each sample runs alone (no padding), so nothing depends on batch composition."""
    if not model.uses_reasoner:
        raise ValueError(f"{NO_LATENTS}: the model has no reasoner or lam=0 (plain SFT of the generator)")
    if latent not in LATENTS:
        raise ValueError(f"latent={latent!r} is not one of: {', '.join(LATENTS)}")
    model.eval()
    scale = embedding_scale(model.generator)  # s, fp32 scalar
    d_r = hidden_size(model.reasoner)
    out: dict[str, list[np.ndarray]] = {}
    for k, row in enumerate(rows):
        prompt, response = tokenize_row(tokenizer, row, max_prompt_length, max_response_length)
        ids = torch.tensor([prompt + response], device=device)  # (1, T)
        positions = torch.arange(ids.shape[1], device=device)[None]  # (1, T)
        states, _ = model.reasoner_states(ids, torch.ones_like(ids), positions, use_cache=False)  # (1, T, d_R)
        states = states[0, len(prompt):]  # (n_resp, d_R): h_t for x_t in the response
        if latent == "rescaled":
            vectors = model.latents(states, scale)  # (n_resp, d_G)
            if model.projection_kind is Projection.PAD:
                vectors = vectors[:, :d_r]  # drop the zero padding: r_t itself
        else:
            vectors = states
        user = str(row["user_id"])
        out.setdefault(user, []).append(vectors.float().cpu().numpy())
        logger.info("sample %d/%d user %s: %d prompt + %d response tokens", k + 1, len(rows), user,
                    len(prompt), len(response))
    return out


# ---- projection and direction fit ------------------------------------------------------------------------

def project_points(points: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, list | None]:
    """(N, d) -> ((N, 2), explained-variance ratios of the 2 components or None for t-SNE)."""
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, svd_solver="full", random_state=seed)
        return pca.fit_transform(points), [float(v) for v in pca.explained_variance_ratio_]
    if method == "tsne":
        from sklearn.manifold import TSNE

        # perplexity must stay below the number of points; 30 is sklearn's default
        perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(points), None
    raise ValueError(f"method={method!r} is not one of: {', '.join(METHODS)}")


def _centred(segments: list[np.ndarray]):
    """Per-sample centred positions p (n,) and coordinates y (n, 2), concatenated; samples < 2 points dropped."""
    ps, ys = [], []
    for seg in segments:
        if len(seg) < 2:
            continue
        p = np.arange(len(seg), dtype=np.float64)
        ps.append(p - p.mean())
        ys.append(seg - seg.mean(axis=0))
    if not ps:
        return None, None
    return np.concatenate(ps), np.concatenate(ys)


def _fit(segments: list[np.ndarray], fit: str):
    """(unit direction (2,), slope (2,), r2) of one user's (or one sample's) 2-D segments, or None."""
    p, y = _centred(segments)
    if p is None:
        return None
    if fit == "lsq":
        slope = p @ y / (p @ p)  # (2,): per-sample-intercept least squares of y on p
        if np.linalg.norm(slope) == 0:
            return None
        direction = slope / np.linalg.norm(slope)
    elif fit == "pca":
        _, _, vt = np.linalg.svd(y, full_matrices=False)
        direction = vt[0] * (1.0 if (p @ y) @ vt[0] >= 0 else -1.0)  # oriented along increasing p
        slope = direction * (p @ (y @ direction)) / (p @ p)
    else:
        raise ValueError(f"fit={fit!r} is not one of: {', '.join(FITS)}")
    total = float((y ** 2).sum())
    r2 = 1.0 - float(((y - p[:, None] * slope) ** 2).sum()) / total if total > 0 else 0.0
    return direction, slope, r2


def angle_between(a: np.ndarray, b: np.ndarray) -> float:
    """Angle in degrees (0..180) between two 2-D unit vectors."""
    return math.degrees(math.acos(float(np.clip(a @ b, -1.0, 1.0))))


def fit_directions(coords: dict[str, list[np.ndarray]], fit: str = "lsq") -> dict:
    """Per-user trajectory directions from 2-D coordinates {user: [(n_i, 2) per sample, token order]}."""
    users, directions = [], []
    for user, segments in coords.items():
        result = _fit(segments, fit)
        entry = {"user_id": user, "n_samples": len(segments), "n_points": int(sum(len(s) for s in segments))}
        if result is None:
            logger.warning("user %s: fewer than 2 response tokens per sample, no direction", user)
            users.append({**entry, "direction": None})
            continue
        direction, slope, r2 = result
        per_sample = [r[0] for r in (_fit([s], fit) for s in segments) if r is not None]
        users.append({**entry, "direction": [float(v) for v in direction],
                      "angle_deg": math.degrees(math.atan2(direction[1], direction[0])),
                      "speed": float(np.linalg.norm(slope)), "r2": r2,
                      "sample_consistency": float(np.linalg.norm(np.mean(per_sample, axis=0)))})
        directions.append(direction)
    summary: dict = {"fit": fit, "users": users}
    if directions:
        mean = np.mean(directions, axis=0)
        pairs = [angle_between(a, b) for i, a in enumerate(directions) for b in directions[i + 1:]]
        summary.update(user_resultant_length=float(np.linalg.norm(mean)),
                       mean_angle_deg=math.degrees(math.atan2(mean[1], mean[0])),
                       mean_pairwise_angle_deg=float(np.mean(pairs)) if pairs else None)
    return summary


def split_like(flat: np.ndarray, latents: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Cut the jointly projected (N, 2) points back into {user: [per-sample arrays]}."""
    out, start = {}, 0
    for user, samples in latents.items():
        out[user] = []
        for sample in samples:
            out[user].append(flat[start:start + len(sample)])
            start += len(sample)
    return out


# ---- output ----------------------------------------------------------------------------------------------

def plot(coords: dict[str, list[np.ndarray]], summary: dict, path: Path, title: str, axes: list[str]) -> None:
    """Points coloured by user (lines join consecutive tokens, ^ marks a sample's first token) and one
    arrow per user from its centroid along the fitted direction (unit length, not to scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    every = np.concatenate([s for segs in coords.values() for s in segs])
    span = float(np.ptp(every, axis=0).max()) or 1.0
    colours = plt.get_cmap("tab10")
    for i, entry in enumerate(summary["users"]):
        colour = colours(i % 10)
        segments = coords[entry["user_id"]]
        for seg in segments:
            ax.plot(seg[:, 0], seg[:, 1], "-", color=colour, alpha=0.1, lw=0.6)
            ax.scatter(seg[:, 0], seg[:, 1], s=8, color=colour, alpha=0.6)
            ax.scatter(seg[:1, 0], seg[:1, 1], s=40, marker="^", color=colour, edgecolors="black", lw=0.5)
        label = f"{entry['user_id']} (n={entry['n_points']})"
        if entry["direction"] is not None:
            centre = np.concatenate(segments).mean(axis=0)
            dx, dy = 0.25 * span * np.asarray(entry["direction"])
            ax.annotate("", xy=(centre[0] + dx, centre[1] + dy), xytext=tuple(centre),
                        arrowprops=dict(arrowstyle="-|>", color=colour, lw=2.2))
            label += f" {entry['angle_deg']:.0f}°, r2={entry['r2']:.2f}"
        ax.plot([], [], "o", color=colour, label=label)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(model, tokenizer, rows: list[dict], out: Path, method: str = "pca", fit: str = "lsq",
        latent: str = "rescaled", seed: int = 0, device: str = "cpu", max_prompt_length: int = 2048,
        max_response_length: int = 1024, meta: dict | None = None) -> dict:
    """Collect, project, fit, and write trajectories.png + trajectories.json into `out`; returns the json."""
    latents = collect_latents(model, tokenizer, rows, latent, max_prompt_length, max_response_length, device)
    flat = np.concatenate([s for samples in latents.values() for s in samples])  # (N, d)
    logger.info("projecting %d latent vectors of dim %d with %s", len(flat), flat.shape[1], method)
    projected, explained = project_points(flat, method, seed)
    coords = split_like(projected, latents)
    summary = fit_directions(coords, fit)
    norms = np.linalg.norm(flat, axis=1)
    report = {"method": method, "latent": latent, "seed": seed, "n_users": len(latents),
              "n_points": int(len(flat)), "latent_dim": int(flat.shape[1]),
              "scale_s": float(embedding_scale(model.generator)),
              "latent_norm_mean": float(norms.mean()), "explained_variance_ratio": explained,
              **summary, **(meta or {})}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "trajectories.json", report)
    axes = ([f"PC{i + 1} ({100 * v:.1f}% var)" for i, v in enumerate(explained)] if explained
            else ["t-SNE 1", "t-SNE 2"])
    title = (f"Reasoner latent trajectories ({latent} latents, {method.upper()}, {fit} fit; "
             f"user resultant length {summary.get('user_resultant_length', float('nan')):.2f})")
    plot(coords, summary, out / "trajectories.png", title, axes)
    logger.info("wrote %s and %s", out / "trajectories.png", out / "trajectories.json")
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m evaluation.trajectories", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="FlyThinker checkpoint, or folder with generator/ reasoner/")
    parser.add_argument("--data", required=True, help="verl parquet with user_id and messages columns")
    parser.add_argument("--out", required=True, help="output folder for trajectories.png/.json")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--samples-per-user", type=int, default=3)
    parser.add_argument("--method", choices=METHODS, default="pca")
    parser.add_argument("--fit", choices=FITS, default="lsq")
    parser.add_argument("--latent", choices=LATENTS, default="rescaled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lam", type=float, default=0.5, help="only for a generator/reasoner folder pair")
    parser.add_argument("--max-prompt-length", type=int, default=2048)
    parser.add_argument("--max-response-length", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    args = parser.parse_args(argv)
    if args.users < 1 or args.samples_per_user < 1:
        parser.error("--users and --samples-per-user must be >= 1")
    logging.basicConfig(level=logging.INFO, format="[trajectories] %(message)s", stream=sys.stderr)
    try:
        if not Path(args.data).exists():
            raise FileNotFoundError(f"data file not found: {args.data}")
        rows = select_rows(pd.read_parquet(args.data), args.users, args.samples_per_user, args.seed, args.data)
        logger.info("loading %s", args.model)
        model, tokenizer = load_model(args.model, args.lam, DTYPES[args.dtype])
        model.to(args.device)
        report = run(model, tokenizer, rows, Path(args.out), args.method, args.fit, args.latent, args.seed,
                     args.device, args.max_prompt_length, args.max_response_length,
                     meta={"model": str(args.model), "data": str(args.data)})
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for u in report["users"]:
        if u["direction"] is not None:
            print(f"user {u['user_id']}: {u['n_points']} points, direction ({u['direction'][0]:+.3f}, "
                  f"{u['direction'][1]:+.3f}) angle {u['angle_deg']:+.1f} deg, r2 {u['r2']:.2f}, "
                  f"sample consistency {u['sample_consistency']:.2f}")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    explained = report["explained_variance_ratio"]
    print(f"user resultant length {fmt(report.get('user_resultant_length'))}, mean pairwise angle "
          f"{fmt(report.get('mean_pairwise_angle_deg'))} deg, explained variance "
          f"{'n/a (t-SNE)' if explained is None else ', '.join(f'{v:.3f}' for v in explained)}")
    return report


if __name__ == "__main__":
    main()
