"""A radial distribution network as plain arrays, for the branch-flow (DistFlow) model.

``GridModel`` is what the network agent's SOCP (poster; Farivar & Low 2013), the DSO's penalty
updates (paths, shared resistances) and the centralized solver need to know about the grid. It is
built from a pandapower net by ``dso_service.networks.grid_model`` but imports nothing from
pandapower, so every role can use it.

Conventions
- Buses are numbered 0..n_bus-1 (for the built-in networks: the pandapower bus index).
- Branch k goes from ``from_bus[k]`` (the end nearer the root) to ``to_bus[k]``: branches are
  oriented away from the root (the slack bus), so every bus except the root has exactly one
  incoming branch, ``parent_branch[bus]``.
- Per unit on ``base_mva`` and each bus's own base voltage ``base_kv[bus]`` (lines: both ends
  share it; transformers: referred to their low-voltage side). ``s_max_pu`` is ``np.inf`` for
  unrated branches.
- Voltage limits ``vm_min_pu`` / ``vm_max_pu`` are scalars, the same for every bus.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class GridModel:
    n_bus: int
    root: int
    base_mva: float
    base_kv: np.ndarray  # (n_bus,) kV
    from_bus: np.ndarray  # (n_branch,) int, nearer the root
    to_bus: np.ndarray  # (n_branch,) int, away from the root
    r_pu: np.ndarray  # (n_branch,)
    x_pu: np.ndarray  # (n_branch,)
    s_max_pu: np.ndarray  # (n_branch,) np.inf where unrated
    branch_kind: tuple[str, ...]  # "line" | "trafo"
    branch_name: tuple[str, ...]
    vm_min_pu: float = 0.95
    vm_max_pu: float = 1.05
    # where each branch comes from: table name ("line" | "trafo" for pandapower nets) and index
    # in that table; "" and -1 when unknown. A transformer modelled as a line (mv37) has
    # branch_kind "trafo" and branch_source "line".
    branch_element: np.ndarray | None = None
    branch_source: tuple[str, ...] | None = None
    # derived (filled in __post_init__)
    parent: np.ndarray = field(init=False, repr=False)  # (n_bus,) parent bus, -1 at the root
    parent_branch: np.ndarray = field(init=False, repr=False)  # (n_bus,) incoming branch, -1 at the root
    children: tuple[np.ndarray, ...] = field(init=False, repr=False)  # child buses of each bus
    child_branches: tuple[np.ndarray, ...] = field(init=False, repr=False)  # outgoing branches of each bus
    depth: np.ndarray = field(init=False, repr=False)  # (n_bus,) number of branches to the root
    order: np.ndarray = field(init=False, repr=False)  # buses root first, every parent before its children

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "base_kv", _as_array(self.base_kv, float, self.n_bus, "base_kv"))
        nbr = len(np.atleast_1d(self.from_bus))
        for name, dtype in (("from_bus", int), ("to_bus", int), ("r_pu", float), ("x_pu", float), ("s_max_pu", float)):
            set_(self, name, _as_array(getattr(self, name), dtype, nbr, name))
        set_(self, "branch_kind", tuple(str(k) for k in self.branch_kind))
        set_(self, "branch_name", tuple(str(k) for k in self.branch_name))
        if len(self.branch_kind) != nbr or len(self.branch_name) != nbr:
            raise ValueError("branch_kind and branch_name need one entry per branch")
        if any(k not in ("line", "trafo") for k in self.branch_kind):
            raise ValueError("branch_kind entries must be 'line' or 'trafo'")
        elem = np.full(nbr, -1, dtype=int) if self.branch_element is None else self.branch_element
        set_(self, "branch_element", _as_array(elem, int, nbr, "branch_element"))
        src = ("",) * nbr if self.branch_source is None else tuple(str(x) for x in self.branch_source)
        if len(src) != nbr:
            raise ValueError("branch_source needs one entry per branch")
        set_(self, "branch_source", src)
        set_(self, "vm_min_pu", float(self.vm_min_pu))
        set_(self, "vm_max_pu", float(self.vm_max_pu))
        if not 0 <= self.root < self.n_bus:
            raise ValueError(f"root {self.root} is not a bus")
        if nbr != self.n_bus - 1:
            raise ValueError(f"a radial network of {self.n_bus} buses has {self.n_bus - 1} branches, got {nbr}")
        if np.any((self.from_bus < 0) | (self.from_bus >= self.n_bus) | (self.to_bus < 0) | (self.to_bus >= self.n_bus)):
            raise ValueError("a branch ends at an unknown bus")
        if np.any(self.r_pu < 0) or np.any(self.s_max_pu <= 0):
            raise ValueError("r_pu must be >= 0 and s_max_pu > 0")

        parent = np.full(self.n_bus, -1, dtype=int)
        parent_branch = np.full(self.n_bus, -1, dtype=int)
        for k, (f, t) in enumerate(zip(self.from_bus, self.to_bus)):
            if t == self.root:
                raise ValueError(f"branch {k} ({self.branch_name[k]}) points into the root: branches must be oriented away from it")
            if parent_branch[t] >= 0:
                raise ValueError(f"bus {t} is fed by two branches ({parent_branch[t]} and {k}): not radial or not oriented")
            parent[t], parent_branch[t] = f, k
        kids: list[list[int]] = [[] for _ in range(self.n_bus)]
        kid_br: list[list[int]] = [[] for _ in range(self.n_bus)]
        for k, (f, t) in enumerate(zip(self.from_bus, self.to_bus)):
            kids[f].append(int(t))
            kid_br[f].append(k)
        depth = np.full(self.n_bus, -1, dtype=int)
        depth[self.root] = 0
        order = [self.root]
        i = 0
        while i < len(order):
            b = order[i]
            for c in kids[b]:
                depth[c] = depth[b] + 1
                order.append(c)
            i += 1
        if len(order) != self.n_bus:
            missing = sorted(set(range(self.n_bus)) - set(order))
            raise ValueError(f"buses {missing[:10]} are not reached from the root")
        set_(self, "parent", parent)
        set_(self, "parent_branch", parent_branch)
        set_(self, "children", tuple(np.asarray(c, dtype=int) for c in kids))
        set_(self, "child_branches", tuple(np.asarray(c, dtype=int) for c in kid_br))
        set_(self, "depth", depth)
        set_(self, "order", np.asarray(order, dtype=int))

    # -- sizes and units ----------------------------------------------------------------------
    @property
    def n_branch(self) -> int:
        return len(self.from_bus)

    @property
    def z_base_ohm(self) -> np.ndarray:
        """Impedance base of each bus, kV^2 / MVA."""
        return self.base_kv**2 / self.base_mva

    def branch_index(self, name: str) -> int:
        try:
            return self.branch_name.index(name)
        except ValueError:
            raise KeyError(name) from None

    # -- paths ----------------------------------------------------------------------------------
    def path_to_root(self, bus: int) -> list[int]:
        """Branch indices from ``bus`` up to the root (the bus's own incoming branch first)."""
        if not 0 <= bus < self.n_bus:
            raise IndexError(f"bus {bus} is not in the network")
        out = []
        b = int(bus)
        while b != self.root:
            k = int(self.parent_branch[b])
            out.append(k)
            b = int(self.from_bus[k])
        return out

    def path_between(self, bus_a: int, bus_b: int) -> list[int]:
        """Branch indices on the unique path between two buses (empty when they are the same bus)."""
        pa, pb = self.path_to_root(bus_a), self.path_to_root(bus_b)
        common = set(pa) & set(pb)
        return [k for k in pa if k not in common] + [k for k in reversed(pb) if k not in common]

    def common_path(self, bus_a: int, bus_b: int) -> list[int]:
        """Branches shared by the two buses' paths to the root (root end last)."""
        pb = set(self.path_to_root(bus_b))
        return [k for k in self.path_to_root(bus_a) if k in pb]

    def path_r_pu(self, branches) -> float:
        """Total resistance of a set of branches, per unit."""
        idx = np.asarray(list(branches), dtype=int)
        return float(self.r_pu[idx].sum()) if idx.size else 0.0

    def downstream_buses(self, branch: int) -> np.ndarray:
        """Buses fed through ``branch`` (its to_bus and everything beyond it)."""
        start = int(self.to_bus[branch])
        out, stack = [], [start]
        while stack:
            b = stack.pop()
            out.append(b)
            stack.extend(int(c) for c in self.children[b])
        return np.asarray(sorted(out), dtype=int)

    def feeder_of(self, bus: int) -> int:
        """The first branch out of the root on the bus's path (-1 for the root itself).

        Buses behind a transformer branch that leaves the root are grouped by the branch after
        it, so "feeder" means an MV feeder leaving the substation busbar.
        """
        path = self.path_to_root(bus)
        if not path:
            return -1
        k = path[-1]
        if self.branch_kind[k] == "trafo" and len(path) >= 2:
            return path[-2]
        return k


def _as_array(value, dtype, n: int, name: str) -> np.ndarray:
    arr = np.array(value, dtype=dtype).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have {n} entries, got {arr.size}")
    return arr
