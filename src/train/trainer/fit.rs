//! [`Trainer::fit`]: the step loop, split along its jobs — laying out the run ([`RunPlan`]), one
//! optimizer step ([`Trainer::train_step`]), logging ([`Trainer::log_step`]), and what follows a
//! step: checkpoints, evaluation and interruption ([`Trainer::after_step`]).

use std::cell::Cell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor, Var};
use indicatif::ProgressBar;
use rankstack_nn::host_transfer::read_computed;
use rankstack_nn::probe::mark;
use rankstack_nn::reseed::child_seed;
use rankstack_nn::{Error, Reseed, Result};

use super::{first_non_finite_gradient, stopped, BatchSource, LossWindow, TrainReport, Trainer};
use crate::data::{LabeledBatch, UploadAhead};
use crate::train::checkpoints::latest_checkpoint;
use crate::train::{clip_scale, evaluate, squared_grad_norm, EvalReport, WarmupCosine};

/// How a run is laid out: steps per epoch, the step count to reach, the learning-rate schedule.
struct RunPlan {
    steps_per_epoch: u64,
    total: u64,
    schedule: WarmupCosine,
}

/// What the loop carries from step to step.
struct RunState {
    /// Throughput counts the training loop (data reading included), not evaluation or checkpoints.
    started: Instant,
    paused: Duration,
    examples: usize,
    last_loss: f64,
    evaluations: Vec<EvalReport>,
    last_checkpoint: Option<PathBuf>,
    /// When the current logging window began (for `input_wait_fraction`).
    window_started: Instant,
}

impl RunState {
    fn examples_per_second(&self) -> f64 {
        self.examples as f64 / self.started.elapsed().saturating_sub(self.paused).as_secs_f64().max(1e-9)
    }

    fn report(self, steps: u64, interrupted: bool) -> TrainReport {
        TrainReport {
            steps,
            interrupted,
            last_loss: self.last_loss,
            examples_per_second: self.examples_per_second(),
            evaluations: self.evaluations,
            checkpoint: self.last_checkpoint.unwrap_or_default(),
        }
    }
}

/// One optimizer step's figures.
struct StepResult {
    loss: f64,
    grad_norm: f64,
    lr: f64,
}

/// How a step ended: updated, or stopped before the update by a non-finite loss or gradient
/// (`what`: `loss` or `gradients`, and why).
enum StepOutcome {
    Updated(StepResult),
    NonFinite { what: &'static str, reason: String },
}

/// What the loop does after a step.
enum Next {
    Continue,
    EndOfEpoch,
    Interrupted,
}

impl Trainer {
    /// Trains until the configured epochs or steps are done (or `stop_after`), evaluating on
    /// `eval` after every epoch. Running out of device memory is reported with the cost planner's
    /// figures and the batch it would fit.
    pub fn fit(&mut self, train: &dyn BatchSource, eval: Option<&dyn BatchSource>) -> Result<TrainReport> {
        self.fit_steps(train, eval).map_err(|e| self.explain_out_of_memory(e))
    }

    fn fit_steps(&mut self, train: &dyn BatchSource, eval: Option<&dyn BatchSource>) -> Result<TrainReport> {
        let plan = self.plan(train.num_rows())?;
        let progress = progress_bar(plan.total, self.options.quiet, self.step);
        let params = self.store.named_vars();
        let mut run = RunState {
            started: Instant::now(),
            paused: Duration::ZERO,
            examples: 0,
            last_loss: f64::NAN,
            evaluations: Vec::new(),
            last_checkpoint: latest_checkpoint(&self.run_dir)?,
            window_started: Instant::now(),
        };
        // Time the loop spends waiting for its next batch (decoding, collating, the copy to the
        // device): while it waits, a GPU has nothing to do.
        let input_wait = Cell::new(Duration::ZERO);
        rankstack_nn::device_memory::reset_peak(&self.device)?;
        let start_step = self.step;
        while self.step < plan.total {
            let epoch = self.step / plan.steps_per_epoch;
            for item in self.epoch_batches(train, &plan, &input_wait)? {
                if self.step >= plan.total {
                    break;
                }
                let b = item?;
                let step = match self.train_step(&b, &params, &plan)? {
                    StepOutcome::Updated(step) => step,
                    StepOutcome::NonFinite { what, reason } => {
                        progress.abandon();
                        return Err(stopped(what, reason, run.last_checkpoint.as_deref()));
                    }
                };
                run.examples += b.rows;
                self.log_step(&step, &b, epoch, &plan, &mut run, &input_wait, start_step, &progress)?;
                match self.after_step(eval, epoch, &plan, &mut run, &progress)? {
                    Next::Continue => {}
                    Next::EndOfEpoch => break,
                    Next::Interrupted => {
                        progress.abandon();
                        return Ok(run.report(self.step, true));
                    }
                }
            }
            if self.step == start_step && self.step < plan.total {
                return Err(Error::input("train", "data", "the training data produced no batches"));
            }
        }
        progress.finish_and_clear();
        Ok(run.report(self.step, false))
    }

    /// Steps per epoch, the total and the schedule, for `rows` training rows.
    fn plan(&self, rows: usize) -> Result<RunPlan> {
        let o = &self.options;
        if rows == 0 {
            return Err(Error::input("train", "data", "the training set is empty"));
        }
        // A last batch of one row is left out of the epoch: BatchNorm cannot normalise one row in
        // training (PyTorch raises there too). The shuffle puts a different row last each epoch.
        if rows == 1 {
            return Err(Error::input("train", "data", "the training set has 1 row; training needs at least 2"));
        }
        let steps_per_epoch = (rows / o.batch_size + usize::from(rows % o.batch_size > 1)) as u64;
        let mut total = steps_per_epoch * o.epochs as u64;
        if let Some(max) = o.max_steps {
            total = if o.epochs == 0 { max } else { total.min(max) };
        }
        let schedule = WarmupCosine {
            peak: o.optimizer.lr,
            warmup: o.warmup_steps.min(total / 2).max(1),
            total,
            min_ratio: o.min_lr_ratio,
        };
        Ok(RunPlan { steps_per_epoch, total, schedule })
    }

    /// The rest of the current epoch's batches (in the epoch's seeded order, past the steps
    /// already taken), on the training device (on a GPU copied one batch ahead, [`UploadAhead`]),
    /// timed into `input_wait`.
    fn epoch_batches<'a>(
        &self,
        train: &'a dyn BatchSource,
        plan: &RunPlan,
        input_wait: &'a Cell<Duration>,
    ) -> Result<impl Iterator<Item = Result<LabeledBatch>> + 'a> {
        let epoch = self.step / plan.steps_per_epoch;
        let skip = (self.step % plan.steps_per_epoch) as usize;
        let order_seed = child_seed(self.options.seed, &format!("epoch-{epoch}"));
        let inner = train.batches(self.options.batch_size, Some(order_seed))?.skip(skip);
        // On a GPU the next batch is copied while this step runs.
        Ok(Timed { inner: UploadAhead::new(inner, &self.device), waited: input_wait })
    }

    /// One optimizer step on `b`: forward, loss, backward, clipping, AdamW. A non-finite loss or
    /// gradient stops before the update spreads it.
    ///
    /// The step reads back from the device once: the loss and the squared gradient norm together,
    /// after the backward pass (on a GPU every read waits for the queued kernels). A non-finite
    /// loss is reported as such although its backward pass ran.
    ///
    /// On the CPU it runs on the kernels' worker pool, so that the step's kernel calls (forward,
    /// backward, AdamW) start without a cross-thread wake-up each ([`crate::nn::on_worker_pool`]).
    fn train_step(&mut self, b: &LabeledBatch, params: &[(String, Var)], plan: &RunPlan) -> Result<StepOutcome> {
        let device = self.device.clone();
        crate::nn::on_worker_pool_for(&device, || self.train_step_on_this_thread(b, params, plan))
    }

    fn train_step_on_this_thread(
        &mut self,
        b: &LabeledBatch,
        params: &[(String, Var)],
        plan: &RunPlan,
    ) -> Result<StepOutcome> {
        let o = &self.options;
        self.ranker.reseed(child_seed(o.seed, &format!("step-{}", self.step)));
        if !self.device.is_cpu() {
            // Dropout masks are drawn on a GPU by its generator: seeded per step, a run is
            // reproducible (and resumable) on that device.
            self.device.set_seed(child_seed(o.seed, &format!("device-step-{}", self.step)))?;
        }
        let logits = self.ranker.forward_t(&b.batch, true)?;
        let loss = self.ranker.loss(&logits, &b.labels, b.example_weights.as_ref())?;
        mark("loss", &loss)?;
        let grads = loss.backward()?;
        let rows = self.ranker.take_row_gradients(&grads)?;
        mark("backward", &loss)?;
        // The global gradient norm before clipping, every step: a growing norm warns of
        // divergence, and a non-finite one stops training before the update spreads it.
        let loss_f64 = loss.to_dtype(DType::F64)?.reshape(1)?;
        let read = match squared_grad_norm(params, &grads, &rows)? {
            Some(squared) => Tensor::cat(&[&loss_f64, &squared.reshape(1)?], 0)?,
            None => loss_f64,
        };
        let read = read_computed::<f64>(&read, "loss and squared gradient norm")?;
        let (value, norm) = (read[0], read.get(1).map_or(0.0, |s| s.sqrt()));
        if !value.is_finite() {
            let reason = format!("non-finite loss ({value}) at step {}", self.step + 1);
            return Ok(StepOutcome::NonFinite { what: "loss", reason });
        }
        if !norm.is_finite() {
            let name = first_non_finite_gradient(params, &grads, &rows)?.unwrap_or_else(|| "?".into());
            let reason = format!("non-finite gradient of `{name}` at step {}", self.step + 1);
            return Ok(StepOutcome::NonFinite { what: "gradients", reason });
        }
        // Clipping's factor goes into the update, which scales each gradient as it reads it (the
        // same bits as scaling the gradients first, without writing them again).
        let scale = o.grad_clip_norm.and_then(|max| clip_scale(norm, max)).unwrap_or(1.0);
        mark("grad_norm", &loss)?;
        let lr = plan.schedule.lr(self.step);
        self.optimizer.step_with_gradient_scale(&grads, &rows, lr, scale)?;
        mark("optimizer", &loss)?;
        self.step += 1;
        self.window.add(value);
        Ok(StepOutcome::Updated(StepResult { loss: value, grad_norm: norm, lr }))
    }

    /// Progress, the one-off `memory` line, and every `log_every` steps a `train` line of
    /// `metrics.jsonl` (mean loss of the window, learning rate, gradient norm, throughput, the
    /// fraction of time spent waiting for input).
    #[allow(clippy::too_many_arguments)]
    fn log_step(
        &mut self,
        step: &StepResult,
        b: &LabeledBatch,
        epoch: u64,
        plan: &RunPlan,
        run: &mut RunState,
        input_wait: &Cell<Duration>,
        start_step: u64,
        progress: &ProgressBar,
    ) -> Result<()> {
        let rate = run.examples_per_second();
        progress.set_position(self.step);
        progress.set_message(format!("loss {:.4}  {rate:.0} ex/s", step.loss));
        if self.step == (start_step + 3).min(plan.total) {
            let line = self.memory_report(b.rows, progress)?;
            self.log(&line)?;
        }
        if self.step.is_multiple_of(self.options.log_every) || self.step == plan.total {
            run.last_loss = self.window.mean();
            let wait = input_wait.replace(Duration::ZERO).as_secs_f64();
            let input_wait_fraction = wait / run.window_started.elapsed().as_secs_f64().max(1e-9);
            run.window_started = Instant::now();
            let line = serde_json::json!({"kind": "train", "step": self.step, "epoch": epoch + 1, "loss": run.last_loss, "lr": step.lr, "grad_norm": step.grad_norm, "examples_per_second": rate, "input_wait_fraction": input_wait_fraction});
            self.log(&line)?;
            self.window = LossWindow::default();
        }
        Ok(())
    }

    /// After a step: the finiteness check and checkpoint when one is due (end of epoch,
    /// `stop_after`, `checkpoint_every`), the evaluation at the end of an epoch. Their time is
    /// excluded from the throughput.
    fn after_step(
        &mut self,
        eval: Option<&dyn BatchSource>,
        epoch: u64,
        plan: &RunPlan,
        run: &mut RunState,
        progress: &ProgressBar,
    ) -> Result<Next> {
        let (batch_size, quiet) = (self.options.batch_size, self.options.quiet);
        let epoch_done = self.step.is_multiple_of(plan.steps_per_epoch) || self.step == plan.total;
        let interrupted = self.options.stop_after == Some(self.step);
        let checkpoint_due =
            epoch_done || interrupted || self.options.checkpoint_every.is_some_and(|k| self.step.is_multiple_of(k));
        let pause_started = Instant::now();
        if checkpoint_due {
            if let Err(e) = self.check_finite_state(run.last_checkpoint.as_deref()) {
                progress.abandon();
                return Err(e);
            }
        }
        if epoch_done {
            if let Some(eval) = eval {
                let report = evaluate(&self.ranker, eval, batch_size, (epoch + 1) as usize, self.step)?;
                let line = serde_json::json!({"kind": "eval", "step": self.step, "epoch": epoch + 1, "loss": report.loss, "tasks": report.tasks});
                self.log(&line)?;
                if !quiet {
                    let summary: Vec<String> =
                        report.tasks.iter().map(|(n, m)| format!("{n} AUC {:.4}", m.auc)).collect();
                    progress.println(format!(
                        "epoch {}: eval loss {:.4}; {}",
                        epoch + 1,
                        report.loss,
                        summary.join(", ")
                    ));
                }
                run.evaluations.push(report);
            }
        }
        if checkpoint_due {
            run.last_checkpoint = Some(self.save_checkpoint()?);
        }
        run.paused += pause_started.elapsed();
        Ok(match (interrupted, epoch_done) {
            (true, _) => Next::Interrupted,
            (false, true) => Next::EndOfEpoch,
            (false, false) => Next::Continue,
        })
    }
}

/// The training progress bar, at `position` of `total` steps (hidden with `quiet`).
fn progress_bar(total: u64, quiet: bool, position: u64) -> ProgressBar {
    let progress = if quiet { ProgressBar::hidden() } else { ProgressBar::new(total) };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  {elapsed_precise}")
            .expect("valid template"),
    );
    progress.set_position(position);
    progress
}

/// An iterator that adds the time spent in each `next` to `waited`.
struct Timed<'a, I> {
    inner: I,
    waited: &'a Cell<Duration>,
}

impl<I: Iterator> Iterator for Timed<'_, I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        let started = Instant::now();
        let item = self.inner.next();
        self.waited.set(self.waited.get() + started.elapsed());
        item
    }
}
