"""Optimisers as in the reference: PyTorch Adam(weight_decay) = L2 added to the gradient before Adam."""
import optax


def step_schedule(lr, decay_every_steps, factor):
  """lr * factor ** floor(step / decay_every_steps) (PyTorch StepLR stepped per epoch)."""
  if decay_every_steps <= 0:
    return optax.constant_schedule(lr)
  return optax.exponential_decay(lr, transition_steps=decay_every_steps, decay_rate=factor,
                                 staircase=True)


def adam_l2(schedule, weight_decay):
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.scale_by_learning_rate(schedule),
  )


def make_optimizer(s, num_train):
  """(optax transform, total steps) of a stage's schedule; `s` is config.ssl or config.tpl.

  Adam with L2 (`adam_l2`), the learning rate `s.lr` times `s.decay_factor` every
  `s.decay_every_epochs` epochs of `num_train * s.repeats` items (see `schedule_steps`).
  """
  schedule, total = lr_schedule(s, num_train)
  return adam_l2(schedule, s.weight_decay), total


def lr_schedule(s, num_train):
  """(step -> learning rate, total steps) of a stage's schedule (see `make_optimizer`)."""
  total, decay = schedule_steps(num_train, s.batch_size, repeats=s.repeats, epochs=s.epochs,
                                decay_every_epochs=s.decay_every_epochs, num_steps=s.num_steps)
  return step_schedule(s.lr, decay, s.decay_factor), total


def schedule_steps(num_train, batch_size, *, repeats, epochs, decay_every_epochs, num_steps=-1):
  """(total steps, decay interval in steps) of an epoch schedule, or compressed to `num_steps`.

  An epoch is `num_train * repeats` items in batches of `batch_size` (drop_last). With `num_steps`
  set, the decay points keep their fraction of the run (e.g. every 1/6 of it for the code schedule).
  """
  per_epoch = max(1, (num_train * repeats) // batch_size)
  total = epochs * per_epoch
  decay = decay_every_epochs * per_epoch
  if num_steps and num_steps > 0:
    decay = max(1, round(num_steps * decay / total)) if decay else 0
    total = num_steps
  return total, decay
