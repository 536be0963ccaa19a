"""Code of the DST bundle: network, losses, data, training engine, evaluation. Modules import each other relatively."""
