"""The papers' measurements of every study run: what each router is claimed to improve, next to its loss.

Per run (router x seed), on fixed probe data shared by every run of the study:

* ``rc``: representation collapse ``Tr(Sigma_W Sigma_B^+)`` of the routed representations, class = top-1 expert
  (X-MoE; :mod:`smoe.analysis.collapse`), averaged over the MoE layers; smaller = more collapsed;
* ``nmi``: normalised mutual information between the top-1 expert and the label (image class; byte class for
  text), averaged over the layers (:mod:`smoe.analysis.specialisation`);
* ``fluct``: routing fluctuation, the fraction of probe tokens whose top-k expert set changed between consecutive
  evaluations, averaged over the evaluations and the layers (StableMoE; :mod:`smoe.analysis.fluctuation`). The
  probe's routing is recorded at every evaluation during training by :class:`ProbeRecorder` (a forward pass of the
  probe set, with the global RNG state saved and restored so that training is unchanged);
* ``robust``: vision -- the mean accuracy over a fixed set of Fashion-MNIST-C corruptions and severities
  (:mod:`smoe.data.corruptions`); language -- the validation loss when 10% of the input tokens are replaced by
  random ones (:func:`smoe.analysis.robustness.contaminated_loss`).
"""

from __future__ import annotations

import math
import pathlib
import statistics

import torch

from smoe.analysis.collapse import representation_collapse
from smoe.analysis.fluctuation import routing_fluctuation
from smoe.analysis.probe import probe_routing
from smoe.analysis.robustness import accuracy, contaminated_loss
from smoe.analysis.specialisation import normalized_mutual_information
from smoe.study.analyze import BYTE_CLASS_NAMES, byte_classes

__all__ = ["StudyProbe", "ProbeRecorder", "measure_run", "plot_routed", "MEASURE_KEYS", "STUDY_CORRUPTIONS"]

MEASURE_KEYS = ("rc", "nmi", "fluct", "robust")
#: the study's robustness set: one corruption of each ImageNet-C family (noise, blur, weather, digital), 3 severities
STUDY_CORRUPTIONS = ("gaussian_noise", "motion_blur", "fog", "contrast", "jpeg_compression")
STUDY_SEVERITIES = (1, 3, 5)
CONTAMINATION_RATE = 0.1


class StudyProbe:
    """The probe data every run of a study is measured on (built once per study).

    Args:
        task: ``"lm"`` or ``"vision"``.
        data: the study's data (:class:`~smoe.data.batches.LMData` or ``ImageData``).
        examples: probe windows (LM) or test images (vision).
        robust_examples: test images corrupted for ``robust`` (vision).
        eval_batches: validation batches of the contaminated-text loss (LM).
    """

    def __init__(self, task: str, data, *, examples: int = 16, robust_examples: int = 256, eval_batches: int = 4):
        self.task = task
        if task == "lm":
            x = torch.cat([b[0] for b in data.eval_batches("validation", max(1, math.ceil(examples / 8)))])[:examples]
            labels = byte_classes(x) if data.vocab_size == 256 else None
            self.batches = [(x, labels)]
            self.eval = list(data.eval_batches("validation", eval_batches))
            self.vocab_size = data.vocab_size
            self.corrupted = None
        else:
            # multiples of 64 images (or the whole split): V-MoE groups of 8 images must divide every batch
            n = min(examples, data.splits.size("test"))
            self.batches = [data.splits.batch("test", torch.arange(n))]
            m = min(robust_examples, data.splits.size("test"))
            images, self.labels = data.splits.batch("test", torch.arange(m))
            # corrupt-tta's corruptions are verified from 28x28 up (data_sources.md); smaller images get none
            self.corrupted = _corrupt(images) if data.image_size >= 28 else None

    def choices(self, model) -> list[torch.Tensor]:
        """Each MoE layer's ``(P, K)`` expert choices on the probe set."""
        return [p.choices_NK for p in probe_routing(model, self.batches)]


def _corrupt(images):
    from smoe.data.corruptions import corrupt_images, corruptions_available  # noqa: PLC0415

    if not corruptions_available():
        return None
    return [corrupt_images(images, c, s, seed=0) for c in STUDY_CORRUPTIONS for s in STUDY_SEVERITIES]


class ProbeRecorder:
    """``on_step`` hook of a study run: records the probe set's routing at every evaluation step (and the last).

    The records are kept in ``run_dir/probe_routing.pt`` (tensors only, loaded with ``weights_only=True``), so a
    resumed run keeps the evaluations before its interruption.
    """

    def __init__(self, probe: StudyProbe, eval_every: int, steps: int, run_dir: pathlib.Path) -> None:
        self.probe, self.eval_every, self.steps = probe, eval_every, steps
        self.path = pathlib.Path(run_dir) / "probe_routing.pt"
        self.records: dict[int, list[torch.Tensor]] = {}
        if self.path.is_file():
            saved = torch.load(self.path, weights_only=True)
            self.records = {int(k): v for k, v in saved.items()}

    def __call__(self, trainer, record: dict) -> None:
        step = trainer.step
        if not ((self.eval_every and step % self.eval_every == 0) or step == self.steps):
            return
        rng = torch.random.get_rng_state()
        try:
            self.records[step] = [c.to(torch.int16) for c in self.probe.choices(trainer.model)]  # E < 32768
        finally:
            torch.random.set_rng_state(rng)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({str(k): v for k, v in self.records.items()}, tmp)
        tmp.replace(self.path)

    def fluctuation(self) -> float:
        """Mean over layers and consecutive recorded evaluations of the fraction of changed expert sets."""
        steps = sorted(self.records)
        if len(steps) < 2:
            return math.nan
        values = [
            routing_fluctuation(a, b)
            for s, t in zip(steps, steps[1:])
            for a, b in zip(self.records[s], self.records[t], strict=True)
        ]
        return statistics.fmean(values)


def measure_run(model, probe: StudyProbe, recorder: ProbeRecorder | None) -> dict[str, float]:
    """``{"rc", "nmi", "fluct", "robust"}`` of a trained model (module docstring); ``nan`` where undefined."""
    out: dict[str, float] = {}
    rcs, nmis = [], []
    for p in probe_routing(model, probe.batches):
        try:
            rcs.append(representation_collapse(p.h_ND, p.top1_N))
        except ValueError:  # fewer than two experts used
            pass
        if p.labels_N is not None:
            nmis.append(normalized_mutual_information(p.top1_N, p.labels_N))
    out["rc"] = statistics.fmean(rcs) if rcs else math.nan
    out["nmi"] = statistics.fmean(nmis) if nmis else math.nan
    out["fluct"] = recorder.fluctuation() if recorder is not None else math.nan
    if probe.task == "lm":
        out["robust"] = contaminated_loss(model, probe.eval, CONTAMINATION_RATE, probe.vocab_size, seed=0)
    elif probe.corrupted is not None:
        out["robust"] = statistics.fmean(accuracy(model, images, probe.labels) for images in probe.corrupted)
    else:
        out["robust"] = math.nan
    return out


def plot_routed(model, probe: StudyProbe, path, *, title: str, max_points: int = 1000) -> pathlib.Path | None:
    """A t-SNE of the last MoE layer's routed representations on the probe set, coloured by top-1 expert and by
    label (:mod:`smoe.analysis.embedding`); ``None`` when matplotlib or scikit-learn is missing."""
    try:
        from smoe.analysis.embedding import embed_2d, plot_embedding, subsample  # noqa: PLC0415

        p = probe_routing(model, probe.batches)[-1]
        idx = subsample(p.h_ND.shape[0], max_points, 0)
        xy = embed_2d(p.h_ND[idx], seed=0)
        labels = None if p.labels_N is None else p.labels_N[idx]
        names = BYTE_CLASS_NAMES if probe.task == "lm" else None
        return plot_embedding(xy, p.top1_N[idx], labels, path, title=f"{title}: {p.name}", label_names=names)
    except ImportError:
        return None
