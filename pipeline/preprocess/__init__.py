"""Raw CT collections -> processed cube datasets (``./run.sh preprocess``).

For every case found by :mod:`pipeline.discovery` the job runs the preprocessing chain of
``transforms`` (``transforms.cube_transforms``: load in HU, RAS, the isotropic R^3 cube with air
padding, the body mask), rounds the HU clipped to [hu_min, hu_max] to integers and writes, each
file atomically, one case folder in the layout asked for (``pipeline.processed`` owns both)::

    OUT_DIR/<dataset>/metadata.csv, dataset_config.json, logs/<case_id>.log
    OUT_DIR/<dataset>/processed/<case_id>/
        hu.chunks, body_mask.chunks, labels.chunks     --layout compact (default), cropped to the body
        ct_normalized_512.npy, windows/*.npy, body_mask_512.npy, labels_512.npy    --layout guide
        case.json                 geometry, body bbox, crop, timings, the metadata row
        .complete                 written last; a rerun skips a case only when it is valid

``--shard K/N`` processes every N-th case (``markers.shard_of``), so N commands (a SLURM array,
an indexed job, ssh loops) share one OUT_DIR: each holds its own lock file, and
``metadata.csv`` is rewritten under ``<dataset>/.metadata.lock`` with the rows of every shard.

Modules: ``cli`` (command line), ``config`` (settings, windows, organ mapping,
dataset_config.json), ``markers`` (case keys, shards, metadata.csv), ``case`` (one case),
``writer`` (background file writers), ``pool`` (worker processes), ``job`` (a whole run).
Run ``python -m pipeline.preprocess --help`` for the command line.
"""

from pipeline import lazy_names
from pipeline.preprocess.cli import main, summary_line

__all__ = ["run", "main", "summary_line"]

__getattr__ = lazy_names(__name__, {"run": "pipeline.preprocess.job"})
