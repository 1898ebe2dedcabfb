//! The chips Kiln generates Ascend C for, and the limits tiling plans against.

use serde::{Deserialize, Serialize};

/// An Ascend SoC family, as `AddConfig` and `ASCEND_COMPUTE_UNIT` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Atlas 200I/500 A2 (dav-m300): one AI core, basic vector APIs only.
    Ascend310b,
    /// Atlas A2 training/inference (dav-c220): AIV-only launches over the
    /// vector cores.
    Ascend910b,
}

/// Bytes of one UB block: DataCopy lengths and UB operand addresses are
/// multiples of it.
pub const BLOCK: usize = 32;

impl Target {
    pub const ALL: [Target; 2] = [Target::Ascend310b, Target::Ascend910b];

    /// The `AddConfig` / `ASCEND_COMPUTE_UNIT` name.
    pub fn compute_unit(self) -> &'static str {
        match self {
            Target::Ascend310b => "ascend310b",
            Target::Ascend910b => "ascend910b",
        }
    }

    /// A representative `--soc_version` for msopgen and atc (the board SKU
    /// may differ: 310B1 and 310B4 share the compute unit).
    pub fn soc_version(self) -> &'static str {
        match self {
            Target::Ascend310b => "Ascend310B4",
            Target::Ascend910b => "Ascend910B1",
        }
    }

    /// UB bytes a kernel's buffers may take. 910B has 192 KB, less the
    /// 8 KB the Ascend C compiler reserves and 256 B. The 310B spec file
    /// says 248 KB, but a public 310B kernel budgets 192 KB: until a board
    /// says otherwise, both get the smaller number.
    pub fn ub_budget(self) -> usize {
        192 * 1024 - 8 * 1024 - 256
    }

    /// Cores a launch is split over: 310B has one AI core; 910B SKUs have
    /// 40 or 48 vector cores, and planning for 40 never makes the smaller
    /// ones run a second wave.
    pub fn cores(self) -> usize {
        match self {
            Target::Ascend310b => 1,
            Target::Ascend910b => 40,
        }
    }

    /// Whether the kernel must be launched AIV-only (split-architecture
    /// chips start the cube cores too otherwise).
    pub fn aiv_only(self) -> bool {
        self == Target::Ascend910b
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.compute_unit())
    }
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        Target::ALL
            .into_iter()
            .find(|t| t.compute_unit() == s)
            .ok_or_else(|| format!("unknown Ascend C target {s:?} (ascend310b or ascend910b)"))
    }
}

/// `n` rounded up to a multiple of `to`.
pub fn align_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Bytes a UB buffer of `bytes` takes: whole blocks.
pub fn ub_bytes(bytes: usize) -> usize {
    align_up(bytes.max(1), BLOCK)
}
