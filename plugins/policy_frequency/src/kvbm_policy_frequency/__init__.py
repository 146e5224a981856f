"""kvbm-policy-frequency: the host -> disk offload frequency filter."""

import numpy as np

from kvbm_core.hookspecs import hookimpl
from kvbm_core.interfaces import OffloadFilter


class FrequencyFilter(OffloadFilter):
    name = "frequency"

    def admit(self, keys):
        return np.ones(len(keys), bool)


@hookimpl
def kvbm_offload_filters():
    return [FrequencyFilter]
