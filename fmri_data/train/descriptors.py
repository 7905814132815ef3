"""Text descriptors of an ROI window from imaging features, for fMRI-LM's stage 2
(arXiv 2511.21760 pairs fMRI with short sentences generated from such features).

Features of one window ``(R, L)`` (parcels x frames):

- functional connectivity (FC): Pearson correlation between parcels;
- network-pair FC: the mean FC within each large-scale network and between each pair, with
  networks read from the parcel names (Schaefer ``LH_Vis_1`` / ``17Networks_RH_DefaultA_3``
  -> visual / default mode; names without a hemisphere/network part -> subcortex);
- graph metrics of the FC graph binarised at ``density`` (strongest positive edges): mean
  clustering coefficient (Watts & Strogatz 1998) and global efficiency (Latora & Marchiori
  2001), with shortest paths from :func:`scipy.sparse.csgraph.shortest_path`.

Numbers are rounded to two decimals so the same window always gives the same sentences.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path

from ..derive.scorers import correlation
from ..errors import SettingError

# Schaefer network name prefixes (7- and 17-network parcellations), longest first.
NETWORKS = (
    ("SalVentAttn", "salience/ventral attention"), ("VentAttn", "ventral attention"), ("DorsAttn", "dorsal attention"),
    ("SomMot", "somatomotor"), ("TempPar", "temporo-parietal"), ("Default", "default mode"), ("Limbic", "limbic"),
    ("Cont", "control"), ("Vis", "visual"),
)


def network_of(label: str) -> str:
    """Large-scale network of a parcel name (``'LH_Vis_1'`` -> ``'visual'``; else ``'subcortex'``)."""
    parts = label.split("_")
    for i, part in enumerate(parts[:-1]):
        if part in ("LH", "RH"):
            for prefix, name in NETWORKS:
                if parts[i + 1].startswith(prefix):
                    return name
    return "subcortex"


def connectivity(window: np.ndarray) -> np.ndarray:
    """FC ``(R, R)`` float64 of a window ``(R, L)`` (Pearson, :func:`fmri_data.derive.scorers.correlation`);
    constant parcels get 0 correlation, the diagonal is 0."""
    fc = correlation(np.asarray(window, dtype=np.float64).T)
    np.fill_diagonal(fc, 0.0)
    return fc


def graph_metrics(fc: np.ndarray, density: float = 0.1) -> tuple[float, float]:
    """(mean clustering coefficient, global efficiency) of ``fc`` binarised at ``density``."""
    r = fc.shape[0]
    iu = np.triu_indices(r, 1)
    n_edges = max(1, int(round(density * len(iu[0]))))
    thr = np.partition(fc[iu], -n_edges)[-n_edges]
    adj = ((fc >= thr) & (fc > 0)).astype(np.float64)
    np.fill_diagonal(adj, 0)
    deg = adj.sum(1)
    triangles = ((adj @ adj) * adj).sum(1) / 2          # diag(A^3) / 2
    possible = deg * (deg - 1) / 2
    clustering = float(np.mean(np.divide(triangles, possible, out=np.zeros(r), where=possible > 0)))
    dist = shortest_path(csr_matrix(adj), method="D", unweighted=True, directed=False)
    inv = np.divide(1.0, dist, out=np.zeros_like(dist), where=np.isfinite(dist) & (dist > 0))
    efficiency = float(inv.sum() / (r * (r - 1)))
    return clustering, efficiency


def describe(window: np.ndarray, labels: list[str], density: float = 0.1) -> str:
    """Short sentences describing a window ``(R, L)`` whose parcels are named by ``labels``.

    Raises:
        SettingError: ``labels`` does not have one name per parcel.
    """
    if len(labels) != window.shape[0]:
        raise SettingError(f"{len(labels)} parcel labels for a window of {window.shape[0]} parcels")
    fc = connectivity(window)
    nets = np.array([network_of(l) for l in labels])
    names = sorted(set(nets))
    idx = {n: np.flatnonzero(nets == n) for n in names}
    within = {n: fc[np.ix_(i, i)][np.triu_indices(len(i), 1)].mean() for n, i in idx.items() if len(i) > 1}
    between = {(a, b): fc[np.ix_(idx[a], idx[b])].mean() for k, a in enumerate(names) for b in names[k + 1:]}
    sentences = []
    if within:
        best = max(within, key=within.get)
        sentences.append(f"Within-network coupling is strongest in the {best} network (mean r = {within[best]:.2f}).")
    if between:
        hi, lo = max(between, key=between.get), min(between, key=between.get)
        sentences.append(f"Between networks, {hi[0]} and {hi[1]} are most coupled (mean r = {between[hi]:.2f}) "
                         f"and {lo[0]} and {lo[1]} least (mean r = {between[lo]:.2f}).")
    clustering, efficiency = graph_metrics(fc, density)
    sentences.append(f"At {density:.0%} edge density the graph has mean clustering {clustering:.2f} "
                     f"and global efficiency {efficiency:.2f}.")
    return " ".join(sentences)
