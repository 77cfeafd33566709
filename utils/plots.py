"""PNG figures of a run: loss curves, confusion matrix, 2-D PCA of embeddings."""

# Figure objects render to files without pyplot, so importing this module never
# switches the backend of a notebook or needs a display on a server.
import io

from matplotlib.figure import Figure
import numpy as np
from sklearn.decomposition import PCA

from utils import fileio


def _write_png(figure, path):
  """Renders the figure to PNG in memory and writes it through tf.io.gfile (matplotlib writes local files only)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=120)
  fileio.write_file(path, buffer.getvalue())
  return path


def loss_curves(epoch_metrics: dict, path: str, keys: tuple[str, ...], title: str) -> str:
  """One line per metric key against the epoch number."""
  figure = Figure(figsize=(6, 4))
  axis = figure.subplots()
  for key in keys:
    if key in epoch_metrics:
      axis.plot(epoch_metrics["epoch"], epoch_metrics[key], marker=".", label=key)
  axis.set_xlabel("epoch")
  axis.set_ylabel("mean over the epoch")
  axis.set_title(title)
  axis.grid(alpha=0.3)
  axis.legend()
  figure.tight_layout()
  return _write_png(figure, path)


def confusion_matrix(matrix: np.ndarray, path: str, title: str) -> str:
  """Row-normalised confusion matrix with counts in the cells."""
  figure = Figure(figsize=(5.5, 5))
  axis = figure.subplots()
  rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  for (row, column), count in np.ndenumerate(matrix):
    axis.text(
      column,
      row,
      str(count),
      ha="center",
      va="center",
      fontsize=7,
      color="white" if rates[row, column] > 0.5 else "black",
    )
  axis.set_xlabel("predicted class")
  axis.set_ylabel("true class")
  axis.set_xticks(range(len(matrix)))
  axis.set_yticks(range(len(matrix)))
  axis.set_title(title)
  figure.tight_layout()
  return _write_png(figure, path)


def pca_projection(embeddings: np.ndarray, labels: np.ndarray, path: str, title: str) -> str:
  """Scatter of the first two principal components, coloured by class."""
  points = PCA(n_components=2).fit_transform(embeddings)
  figure = Figure(figsize=(6, 5))
  axis = figure.subplots()
  scatter = axis.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6, alpha=0.8)
  axis.legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
  axis.set_xlabel("PC 1")
  axis.set_ylabel("PC 2")
  axis.set_title(title)
  figure.tight_layout()
  return _write_png(figure, path)
