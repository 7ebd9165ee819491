"""SSD-1B: SDXL → 1.33 B parameters (down 10→4 layers, up 10→4/2→1, mid block one resnet), distilled
with task + 0.5 output + 0.5 feature loss at 1024², lr 1e-5, batch 32 × 4 accumulation.

    python -m jaxdistill.train --config configs/ssd1b.py --config.teacher=SDXL_DIR \
        --workdir runs/ssd1b
"""

from jaxdistill.config import base_config


def get_config():
    c = base_config()
    c.plan = "ssd1b"
    return c
