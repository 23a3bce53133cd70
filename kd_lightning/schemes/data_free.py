"""Data-free distillation: the student learns from the frozen teacher on synthetic batches only.

`DataFree` is the base of every data-free scheme (DAFL, DFAD, ZSKT, the N(0,1) floor here; DeepInversion
and Fast-Datafree build on it). Its interface, kept stable:

* A subclass implements `data_free_step() -> dict[str, Tensor]`: the whole of one training step, returning
  the losses to log (already weighted; names without prefix). It draws noise with `self.noise(*shape)`,
  synthesises images (`self.generator`, built from `scheme.generator` when `uses_generator`; the teacher
  with input gradients: `self.teacher_with_grad(images)`), trains the student on them with
  `self.student_losses(images)` and `self.optimise(student_loss=..., generator_loss=...)`, and calls
  `self.remember(images)` on the batch the image grid should show. Exactly one student step per call.
* Batches come from the data module's `steps` source (`train_batches = "steps"`): one record per step,
  `steps_per_epoch` per epoch and rank, no image; the real training split is never read. The noise of a step
  is a function of (run seed, epoch, record), so each DDP rank draws its own and a resumed run the
  uninterrupted run's.
* `global_step` counts student steps only (`schemes.manual`): `max_steps`, checkpoint and logging cadences
  and step schedules follow the student. The schedule (`scheme.schedule`, else the run's `scheduler`) reaches
  the optimizers the scheme's reference schedules (`scheduled_players`: the student's alone unless the
  reference anneals its generator too, as DFAD and ZSKT do), one scheduler each, stepped by hand after each
  training step, as automatic optimisation would (`schemes.manual.step_schedulers`). `scheme.schedule` counts
  epochs (T_max: trainer.max_epochs), so `scheduler_interval=step` beside it is refused, and so is
  `scheduled=false` beside it, which would drop it without a word.
* The generator, the terms' adapters and all optimizers and schedulers are in the checkpoint; the teacher
  stays outside it (`Offline`), frozen and in eval mode while gradients flow through it to the images.
* Every `log_images_every_n_steps` student steps a grid of the remembered batch goes to
  `<stage dir>/synthetic/step_<n>.png` and to the loggers that take images (W&B, TensorBoard).

The student's distillation on synthetic batches uses the `distill` terms (targets = the teacher's argmax,
no indices); terms that need sample indices or an initialisation stage on data are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from kd_lightning.data.base import STEPS
from kd_lightning.data.resumable import global_seed
from kd_lightning.data.steps import step_seed
from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms.base import DistillInputs, DistillTerm
from kd_lightning.models.generator import ImageGenerator
from kd_lightning.schemes.composition import describe_loss
from kd_lightning.schemes.manual import scheduler_configs, step_schedulers, uncounted_step
from kd_lightning.schemes.offline import Offline, weighted_term_losses
from kd_lightning.schemes.watch import NonFiniteWatch

GRID_IMAGES = 64


def check_data_free_terms(terms: Mapping[str, DistillTerm], scheme: str) -> None:
    """Refuse terms a synthetic batch cannot feed: it has no sample indices and no data for an init stage."""
    refused = {name: ("sample indices" if term.needs_indices else "an initialisation stage on training data")
               for name, term in terms.items() if term.needs_indices or term.init_epochs > 0}
    if refused:
        listed = ", ".join(f"{name} (needs {why})" for name, why in refused.items())
        raise ConfigError(
            f"scheme={scheme} trains the student on synthetic batches, which have neither sample indices nor a "
            f"training set to initialise on, so distill terms {listed} cannot work. Use terms that read the "
            f"logits and features of the batch itself: kd, at, fitnet, sp, rkd, pkt, nst, cc, dkd, vid, ofd, "
            f"e.g. distill=[kd].")
    if not terms:
        raise ConfigError(f"scheme={scheme} distils the student from the teacher through its `distill` terms, but "
                          f"distill=[] names none. Use distill=[kd] (the references' KL on logits).")


def check_generator_sizes(options: Mapping[str, Any]) -> None:
    """Refuse sizes torch would only reject deep inside a layer's constructor or forward (or accept and NaN)."""
    for name in ("latent_dim", "width", "channels"):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or int(value) != value or value < 1):
            raise ConfigError(f"scheme.generator.{name}={value!r} must be a whole number >= 1 (the references: "
                              f"latent_dim 100 for DAFL/DFAD, 256 for Fast-Datafree; width 64; channels null = the "
                              f"data's). Set scheme.generator.{name} to a positive integer.")
    eps = options.get("bn_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0):
        raise ConfigError(f"scheme.generator.bn_eps={eps!r} must be a number > 0: BatchNorm divides by "
                          f"sqrt(var + eps). DAFL uses 0.8, DFAD the default 1e-5.")


def own_schedule(schedule: Mapping[str, Any]) -> Any:
    """`scheme.schedule` as a scheduler factory, tried on a throwaway optimizer so that a wrong target or
    argument is refused before training rather than in `configure_optimizers`."""
    try:
        factory = instantiate({"_partial_": True, **schedule})
        factory(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0))
    except Exception as error:  # Hydra wraps import and argument errors in its own exception types
        raise ConfigError(f"scheme.schedule={dict(schedule)} is not a scheduler config ({error}). Give a torch "
                          f"scheduler and its arguments, e.g. {{_target_: torch.optim.lr_scheduler.CosineAnnealingLR, "
                          f"T_max: 200, eta_min: 2.0e-4}}, or null for the run's `scheduler`.") from None
    return factory


class DataFree(Offline):
    """The base of data-free schemes; see the module docstring for the interface subclasses implement."""

    train_batches = STEPS
    uses_generator = False
    # The optimizers the schedule reaches: the references anneal the student's rate and keep the generator's
    # constant (DAFL's CIFAR recipe, zju-vipa's datafree_kd.py), except DFAD and ZSKT, which schedule both.
    scheduled_players: ClassVar[tuple[str, ...]] = ("student",)
    trains_on_mixed_batches: ClassVar[bool] = False  # its batches are synthesised, never mixed real ones
    # Losses a subclass logs besides the terms (names as returned by `data_free_step`), for the NaN watch.
    generator_losses: tuple[str, ...] = ()

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: Mapping[str, DistillTerm], num_classes: int,
                 example_input: Tensor, steps_per_epoch: int = 400, batch_size: int = 256,
                 generator: Mapping[str, Any] | None = None, train_generator: bool = True,
                 generator_optimizer: Mapping[str, Any] | None = None,
                 student_optimizer: Mapping[str, Any] | None = None, scheduled: bool = True,
                 schedule: Mapping[str, Any] | None = None,
                 clip_grad_norm: float | None = None, log_images_every_n_steps: int = 0, **base: Any) -> None:
        check_data_free_terms(terms, type(self).__name__.lower())
        if isinstance(example_input, Mapping):
            raise ConfigError(f"scheme {type(self).__name__} is data-free: its student learns from images a generator "
                              f"makes in the teacher's input shape, never from the data's samples, so it has no "
                              f"named inputs to choose from (the run has {sorted(example_input)}). Remove the "
                              f"inputs.<role> and inputs.views settings and use single-input data, or choose a "
                              f"scheme that reads the data (scheme=offline).")
        for name, value in (("steps_per_epoch", steps_per_epoch), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ConfigError(f"scheme.{name} must be a positive integer, got {value!r}.")
        if int(log_images_every_n_steps) < 0:
            raise ConfigError(f"scheme.log_images_every_n_steps must be >= 0 (0: no image grids), got "
                              f"{log_images_every_n_steps!r}.")
        super().__init__(student, teacher, terms, num_classes, example_input, ce_weight=0.0, **base)
        self.automatic_optimization = False
        if schedule and not scheduled:
            # Refused rather than dropped: a schedule written into the config and then silently not run would
            # leave the rates constant with nothing in the log to say so.
            raise ConfigError(f"scheme.schedule is set but scheme.scheduled=false, which trains at constant rates "
                              f"and would ignore it. Set scheme.schedule=null for constant rates, or "
                              f"scheme.scheduled=true to run the schedule.")
        if schedule and self.scheduler_interval != "epoch":
            # The schemes' schedules count epochs (T_max: ${trainer.max_epochs}); stepped per batch, the cosine
            # would reach its floor after max_epochs steps and climb back, restarting every 2·max_epochs steps.
            raise ConfigError(f"scheme.schedule is stepped once per epoch (its T_max and milestones count epochs), "
                              f"but scheme.scheduler_interval={self.scheduler_interval!r}. Drop the "
                              f"scheduler_interval override, or set scheme.schedule=null and give the run's "
                              f"`scheduler` a schedule counted in steps.")
        if schedule:  # the scheme's own recipe (e.g. DF's cosine to 2e-4), like `student_optimizer`
            self.scheduler_factory = own_schedule(schedule)
        if not scheduled:  # the references' MNIST recipes train at constant rates
            self.scheduler_factory = None
        self.steps_per_epoch, self.batch_size = int(steps_per_epoch), int(batch_size)
        self.input_shape = tuple(example_input.shape[1:])
        self.train_generator = bool(train_generator)
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.log_images_every_n_steps = int(log_images_every_n_steps)
        self.student_optimizer_cfg = dict(student_optimizer) if student_optimizer else None
        self.generator_optimizer_cfg = dict(generator_optimizer or {"_target_": "torch.optim.Adam", "lr": 1e-3})
        self.generator = self._build_generator(dict(generator or {})) if self.uses_generator else None
        self.nonfinite = NonFiniteWatch([*self.terms, *self.generator_losses])
        self._record = 0
        self._noise: torch.Generator | None = None
        self._shown: Tensor | None = None

    # --- what subclasses use -----------------------------------------------------------------------------
    def data_free_step(self) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement data_free_step()")

    def noise(self, *shape: int) -> Tensor:
        """N(0, 1) noise from this step's own generator (seeded by run seed, epoch and step record)."""
        return torch.randn(*shape, generator=self._noise, device=self.device)

    def latent(self) -> Tensor:
        assert self.generator is not None
        return self.noise(self.batch_size, self.generator.latent_dim)

    def teacher_with_grad(self, images: Tensor) -> Tensor:
        """Teacher logits through which a loss reaches `images` (weights frozen, BN in eval mode)."""
        return self.teacher.forward_with_input_grad(images)

    def student_losses(self, images: Tensor, teacher_logits: Tensor | None = None) -> dict[str, Tensor]:
        """The weighted `distill` terms of the student on `images` (detached: the student's loss never
        reaches the synthesiser), against the teacher's logits and tapped features on the same batch."""
        images = images.detach()
        if teacher_logits is None or self.teacher_taps.features:
            # Under no_grad, refilling the teacher taps the terms read: features tapped by a forward with input
            # gradients would let the student's loss reach the synthesiser through them.
            fresh = self.teacher(images)
            teacher_logits = fresh if teacher_logits is None else teacher_logits
        teacher_logits = teacher_logits.detach()
        student_logits = self.student(images)
        inputs = DistillInputs(student_logits=student_logits, targets=teacher_logits.argmax(1), indices=None,
                               teacher_logits=teacher_logits, student_features=self.student_taps.features,
                               teacher_features=self.teacher_taps.features, epoch=self.current_epoch)
        return weighted_term_losses(self.terms, inputs, self.nonfinite, self.global_step)

    def optimise(self, student_loss: Tensor | None = None, generator_loss: Tensor | None = None) -> None:
        """One backward of the given losses, then a step of each optimizer they concern: the student's is
        the counted training step, the generator's is not (and is skipped when `train_generator` is off).
        Both at once is DAFL's joint update (one backward, also under DDP)."""
        student_opt, generator_opt = self.student_and_generator_optimizers()
        if not self.train_generator:
            generator_loss = None
        parts = [(loss, opt) for loss, opt in ((student_loss, student_opt), (generator_loss, generator_opt))
                 if loss is not None]
        if not parts:
            return
        for _, optimizer in parts:
            optimizer.zero_grad()
        self.manual_backward(torch.stack([loss.float() for loss, _ in parts]).sum())
        for _, optimizer in parts:
            if self.clip_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.clip_grad_norm, gradient_clip_algorithm="norm")
        if generator_loss is not None:
            uncounted_step(self, generator_opt)
        if student_loss is not None:
            student_opt.step()

    def student_and_generator_optimizers(self) -> tuple[Any, Any]:
        """(the student's LightningOptimizer, the generator's or None)."""
        optimizers = self.optimizers()
        if isinstance(optimizers, list):
            return optimizers[0], optimizers[1]
        return optimizers, None

    def remember(self, images: Tensor) -> None:
        """The batch the next image grid shows."""
        self._shown = images.detach()

    # --- the training step ------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer.training:
            self._record = int(batch[0])  # read in host memory: no device sync
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._noise = torch.Generator(device=self.device).manual_seed(
            step_seed(global_seed(), self.current_epoch, self._record))
        losses = self.data_free_step()
        step_schedulers(self)
        student = torch.stack([losses[name].float() for name in losses if not name.startswith("generator")]).sum()
        self.log("train/loss", student, batch_size=self.batch_size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=self.batch_size)
        if self.is_logging_step():
            self.log("loss", student.detach().cpu(), prog_bar=True, logger=False, batch_size=self.batch_size)
        self.release_features()
        return student.detach()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        every = self.log_images_every_n_steps
        if every and self.global_step % every == 0 and self._shown is not None and self.trainer.is_global_zero:
            self.log_image_grid(self._shown[:GRID_IMAGES])

    def log_image_grid(self, images: Tensor) -> Path:
        """Save `images` as a PNG grid under the stage directory and send it to every image-taking logger."""
        from torchvision.utils import make_grid, save_image

        grid = make_grid(images.float().cpu(), nrow=8, normalize=True)
        path = Path(self.trainer.default_root_dir) / "synthetic" / f"step_{self.global_step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for logger in self.loggers:
            kind = type(logger).__name__
            if kind == "WandbLogger":
                logger.log_image(key="synthetic", images=[grid], step=self.global_step)
            elif kind == "TensorBoardLogger":
                logger.experiment.add_image("synthetic", grid, self.global_step)
        return path

    # --- optimizers, generator --------------------------------------------------------------------------
    def student_parameters(self) -> list[nn.Parameter]:
        generator = {id(p) for p in self.generator.parameters()} if self.generator is not None else set()
        return [p for p in self.trainable_parameters() if id(p) not in generator]

    def configure_optimizers(self) -> Any:
        factory = instantiate({"_partial_": True, **self.student_optimizer_cfg}) if self.student_optimizer_cfg \
            else self.optimizer_factory
        optimizers = [factory(self.student_parameters())]
        if self.generator is not None:
            optimizers.append(instantiate({"_partial_": True, **self.generator_optimizer_cfg})(
                self.generator.parameters()))
        players = self._players()
        scheduled = [opt for opt, player in zip(optimizers, players) if player in self.scheduled_players]
        return optimizers, scheduler_configs(scheduled, self.scheduler_factory, self.scheduler_interval)

    def _players(self) -> tuple[str, ...]:
        """The optimizers' owners, in `configure_optimizers`' order."""
        return ("student", "generator") if self.generator is not None else ("student",)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("lr_schedulers")
        expected = 0 if self.scheduler_factory is None else \
            sum(player in self.scheduled_players for player in self._players())
        # Lightning zips the saved scheduler states with the configured schedulers, so a surplus state (the
        # generator's, in Fast-Datafree checkpoints and DAFL ones with scheduled=true written before only the
        # student was scheduled) would be dropped and a missing one started afresh, without a word.
        if saved is not None and len(saved) != expected:
            raise ConfigError(f"This checkpoint holds {len(saved)} learning-rate scheduler state(s), but "
                              f"{type(self).__name__} with these settings schedules {expected} "
                              f"(players {list(self.scheduled_players) if expected else []}; scheme.scheduled, "
                              f"scheme.schedule and the run's `scheduler` decide). It was written by another version "
                              f"or other schedule settings: resume with those, or start without ckpt_path (the "
                              f"student's weights can still initialise a new run).")

    def _build_generator(self, options: dict[str, Any]) -> ImageGenerator:
        channels, height, width = self.input_shape
        if options.get("channels") is None:
            options["channels"] = channels
        size = options.pop("image_size", None)
        options["image_size"] = (height, width) if size is None else (
            (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size))
        options.setdefault("latent_dim", 100)
        check_generator_sizes(options)
        try:
            generator = ImageGenerator(**options)
        except TypeError as error:
            raise ConfigError(f"scheme.generator={options} is not a generator config ({error}). Its keys: latent_dim, "
                              f"width, bn_eps, tanh, affine_output, image_size, channels.") from None
        with torch.no_grad():
            made = generator.eval()(torch.randn(2, generator.latent_dim))
        generator.train()
        if tuple(made.shape[1:]) != self.input_shape:
            raise ConfigError(
                f"The generator makes images of shape {tuple(made.shape[1:])}, but the teacher's input (the data "
                f"module's) is {self.input_shape}. Leave scheme.generator.image_size and scheme.generator.channels "
                f"unset (null) to take the data's shape, or set them to {self.input_shape[1:]} and "
                f"{self.input_shape[0]}.")
        return generator

    def loss_summary(self) -> str:
        synthesis = f"{type(self).__name__} synthesis" + ("" if self.train_generator or not self.uses_generator
                                                          else " (generator untrained)")
        return " + ".join(["loss = " + synthesis, *describe_loss(0.0, self.terms).split(" + ")[1:]])
