"""Code of the S2CAC bundle: network, losses, training workflow, scoring. Modules import each other relatively."""
