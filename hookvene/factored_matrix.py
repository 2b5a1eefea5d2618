"""`FactoredMatrix`: a low-rank matrix M = A @ B kept as its two factors (TransformerLens's class, same semantics).

A transformer's QK circuit W_Q W_K^T and OV circuit W_V W_O are d_model x d_model matrices of rank d_head. Multiplying
them out costs d_model^2 memory per head; the factored form answers the questions asked of them (products, SVD,
eigenvalues, norms) from the factors, in O(d_model d_head^2). Leading dims broadcast: `model.QK` is one matrix per
(layer, head), indexed `model.QK[layer, head]`.

Imports nothing from hookvene (the foundation layer).
"""

from typing import Union

import torch
from jaxtyping import Complex, Float
from torch import Tensor

Operand = Union[Tensor, "FactoredMatrix"]


class FactoredMatrix:
    """M = A @ B with A (..., ldim, mdim) and B (..., mdim, rdim); M is (..., ldim, rdim) and never built unless
    asked for (`AB`)."""

    def __init__(self, A: Float[Tensor, "... ldim mdim"], B: Float[Tensor, "... mdim rdim"]) -> None:
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix factors do not chain: A is {tuple(A.shape)} and B is {tuple(B.shape)} "
                             f"(A's last dim must equal B's second to last)")
        # Broadcast the leading dims once, so indexing and every product see one batch shape.
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        self.A = A.expand(*batch, *A.shape[-2:])
        self.B = B.expand(*batch, *B.shape[-2:])
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]

    # -- shape -------------------------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.A.shape[:-2], self.ldim, self.rdim))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim})"

    # -- the matrix and its transposes -------------------------------------------------------------------------
    @property
    def AB(self) -> Float[Tensor, "... ldim rdim"]:
        """The full product A @ B (builds the ldim x rdim matrix)."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "... mdim mdim"]:
        """B @ A (mdim x mdim; needs ldim == rdim): same non-zero eigenvalues as AB, at a fraction of the size."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix, this one is {self.ldim} x {self.rdim}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    # -- products ----------------------------------------------------------------------------------------------
    def __matmul__(self, other: Operand) -> "FactoredMatrix":
        """M @ X, still factored: a matrix joins the side it multiplies (a vector gives a plain tensor)."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if other.ndim == 1:
            return self.A @ (self.B @ other)
        if other.shape[-2] != self.rdim:
            raise ValueError(f"cannot multiply a {tuple(self.shape)} FactoredMatrix by {tuple(other.shape)}")
        if other.shape[-1] < self.mdim:  # the product is of lower rank: keep it in the smaller factor
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Tensor) -> "FactoredMatrix":
        """X @ M."""
        if other.ndim == 1:
            return (other @ self.A) @ self.B
        if other.shape[-1] != self.ldim:
            raise ValueError(f"cannot multiply {tuple(other.shape)} by a {tuple(self.shape)} FactoredMatrix")
        if other.shape[-2] < self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: float | Tensor) -> "FactoredMatrix":
        """Scaling by a number (or a tensor of the leading dims' shape)."""
        if isinstance(scalar, Tensor) and scalar.ndim:
            scalar = scalar[..., None, None]
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # -- spectral ----------------------------------------------------------------------------------------------
    def svd(self) -> tuple[Float[Tensor, "... ldim mdim"], Float[Tensor, "... mdim"], Float[Tensor, "... rdim mdim"]]:
        """U, S, V with M = U diag(S) V^T (the mdim non-trivial singular triples), from the factors' SVDs."""
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        # M = Ua (diag(Sa) Vha Ub diag(Sb)) Vhb: only the small middle matrix needs a fresh SVD.
        Um, Sm, Vhm = torch.linalg.svd(Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :], full_matrices=False)
        U, V = Ua @ Um, Vhb.transpose(-2, -1) @ Vhm.transpose(-2, -1)
        return U, Sm, V

    @property
    def U(self) -> Tensor:
        return self.svd()[0]

    @property
    def S(self) -> Tensor:
        return self.svd()[1]

    @property
    def Vh(self) -> Tensor:
        return self.svd()[2]

    @property
    def eigenvalues(self) -> Complex[Tensor, "... mdim"]:
        """The non-zero eigenvalues of M (complex), from B @ A, which has the same non-zero spectrum."""
        return torch.linalg.eig(self.BA).eigenvalues

    def norm(self) -> Float[Tensor, "..."]:
        """Frobenius norm of M."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> "FactoredMatrix":
        """The same M with A = U sqrt(S) and B = sqrt(S) V^T: both factors carry half of the spectrum."""
        U, S, V = self.svd()
        root = S.sqrt()
        return FactoredMatrix(U * root[..., None, :], root[..., :, None] * V.transpose(-2, -1))

    # -- indexing and helpers ----------------------------------------------------------------------------------
    def __getitem__(self, idx: int | slice | tuple) -> "FactoredMatrix":
        """Index the leading dims (`QK[layer, head]`); the matrix dims are kept whole."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > self.ndim - 2:
            raise IndexError(f"a FactoredMatrix of shape {tuple(self.shape)} has {self.ndim - 2} leading dims to "
                             f"index, got {len(idx)} indices")
        return FactoredMatrix(self.A[idx], self.B[idx])

    def get_corner(self, k: int = 3) -> Tensor:
        """The top-left k x k corner of M, computed without building M."""
        return self.A[..., :k, :] @ self.B[..., :, :k]

    def collapse_l(self) -> Float[Tensor, "... mdim rdim"]:
        """S V^T: M with its left singular basis dropped (the same up to a rotation on the left)."""
        _, S, V = self.svd()
        return S[..., :, None] * V.transpose(-2, -1)

    def collapse_r(self) -> Float[Tensor, "... ldim mdim"]:
        """U S: M with its right singular basis dropped."""
        U, S, _ = self.svd()
        return U * S[..., None, :]

    def unsqueeze(self, dim: int = 0) -> "FactoredMatrix":
        if dim < 0:
            dim += self.ndim - 1  # among the leading dims
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))


def composition_score(left: FactoredMatrix, right: FactoredMatrix) -> Float[Tensor, "..."]:
    """||left @ right||_F / (||left||_F ||right||_F), over broadcast leading dims: how much of what `left` writes
    `right` reads (1 when right reads exactly left's output space, about sqrt(d_head / d_model) for random
    matrices). Elhage et al. 2021's composition score; TransformerLens's `utils.composition_scores`."""
    if left.rdim != right.ldim:
        raise ValueError(f"a composition score needs left's output dim to equal right's input dim: left is "
                         f"{tuple(left.shape)}, right is {tuple(right.shape)}")
    return (left @ right).norm() / (left.norm() * right.norm())
