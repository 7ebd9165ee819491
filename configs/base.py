"""The defaults every config starts from (SSD-1B's recipe); see `jaxdistill/config.py` for every field.

    python -m jaxdistill.train --config configs/base.py --config.teacher=SDXL_DIR --workdir runs/x
"""

from jaxdistill.config import base_config


def get_config():
    return base_config()
