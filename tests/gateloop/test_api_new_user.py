"""Argument checks of the public entries a new user hits first: clear errors that name the argument."""
import pytest
import torch

import gateloop_kernels as gk


def test_preactivation_of_a_scalar_names_z():
    with pytest.raises(ValueError, match="z must end in a dimension of 2"):
        gk.gate_from_preactivation(torch.tensor(1.0))
