"""The DSO's networks: ``common.networks`` (the pandapower networks of the scenarios and their radial
branch data), under the name the DSO's modules import. The builders live in ``common`` because the
fees of product differentiation (``common.differentiation``) are computed from the same network."""

from common.networks import (  # noqa: F401
    MV37_PLACEMENT,
    TRAFO_LINE_NAME,
    UNRATED_MAX_I_KA,
    branch_lengths_km,
    build_mv37,
    build_network,
    grid_model,
    is_trafo_line,
)
