"""The embedded default: the whole path on a CPU in a few minutes.

Stage "teacher" trains a tiny SDXL-shaped UNet (SDXL's depths at tiny widths) from scratch on a generated
latent image set — plain diffusion training, no teacher — so that there is a real denoiser to distil.
Stage "ssd1b" prunes it with the ssd1b plan and distils the student from it. With --config.teacher=DIR
the first stage is skipped and that teacher is distilled instead.

    python -m jaxdistill.train --config configs/tiny.py --workdir runs/tiny
"""

from jaxdistill.config import base_config


def get_config():
    c = base_config()
    c.model = "tiny-sdxl"
    c.data.resolution = 64  # 8×8 latents
    c.data.seq_len = 8
    c.data.num_examples = 32
    c.batch_size = 8
    c.optimizer.accumulation = 1
    c.optimizer.warmup_steps = 10
    c.precision.teacher = "float32"  # XLA:CPU gains nothing from bf16
    c.precision.student_compute = "float32"
    c.log_every = 10
    c.checkpoint_every = 50
    c.steps = 150
    c.stages = [
        dict(name="teacher", model="tiny-sdxl", plan="", steps=400, loss=dict(output=0.0, feature=0.0),
             optimizer=dict(lr=1e-3, schedule="cosine")),
        dict(name="ssd1b", teacher="previous", plan="ssd1b", steps=150, lr=5e-5),
    ]
    return c
