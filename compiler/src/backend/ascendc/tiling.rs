//! Host-side tiling, computed in Rust from the static shapes: how each
//! kernel cuts its work into UB-sized tiles and over cores.
//!
//! Every UB buffer size a kernel allocates is a field of its tiling, so the
//! kernel never recomputes a size and the UB total checked here is the one
//! the kernel's `InitBuffer` calls add up to (the emulation checks it again).
//! All fields are 4 bytes wide (`u32` or `f32`), so the struct's layout is
//! the same in the host's `SaveToBuffer`, the kernel's `GET_TILING_DATA`
//! and the bytes the tests hand the emulated kernel.

use super::target::{align_up, ub_bytes, Target, BLOCK};
use super::AscendcError;
use serde::{Deserialize, Serialize};

/// Queue depth and buffers per queue: the next tile's copy-in overlaps the
/// current tile's compute.
pub const BUFFER_NUM: usize = 2;

/// Elements of f32 one vector repeat covers (256 bytes): chunk lengths are
/// kept multiples of it so chunk offsets stay 32-byte aligned in f32.
const F32_PER_REPEAT: usize = 64;

/// The largest row tile of a GEMV (DataCopyPad takes at most 4095 blocks).
const MAX_GEMV_ROWS: usize = 1024;

/// A row tile this small or smaller makes a GEMV chunk K instead.
const MIN_GEMV_ROWS: usize = 8;

/// A GEMV call reads at most this many weight bytes: wider layers such as
/// `lm_head` are split into column chunks, each its own call.
pub const MAX_GEMV_CHUNK_WEIGHT_BYTES: usize = 32 << 20;

/// One field of a tiling struct, for the generated C++ and the harness.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TilingField {
    pub name: &'static str,
    pub c_type: &'static str,
    /// The value as a C++ literal.
    pub literal: String,
    /// The value's 4 bytes, as the struct holds them.
    pub word: u32,
}

trait FieldValue: Copy {
    fn field(self, name: &'static str) -> TilingField;
}

impl FieldValue for u32 {
    fn field(self, name: &'static str) -> TilingField {
        TilingField {
            name,
            c_type: "uint32_t",
            literal: format!("{self}u"),
            word: self,
        }
    }
}

impl FieldValue for f32 {
    fn field(self, name: &'static str) -> TilingField {
        // The exact bits, written so that the C++ compiler reads the same float.
        TilingField {
            name,
            c_type: "float",
            literal: format!("{self:e}f"),
            word: self.to_bits(),
        }
    }
}

macro_rules! tiling_struct {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// The fields in declaration order: the C struct's layout.
            pub fn fields(&self) -> Vec<TilingField> {
                vec![$(self.$field.field(stringify!($field)),)*]
            }
        }
    };
}

tiling_struct!(
    /// RMSNorm and residual Add + RMSNorm over rows of `cols`. A row that
    /// fits is normalized in one pass; a longer one in `chunks` chunks, two
    /// passes (sum of squares, then scale), reading the row twice.
    RmsNormTiling {
        rows: u32,
        cols: u32,
        chunk: u32,
        chunks: u32,
        /// Elements of the last chunk.
        tail: u32,
        rows_per_core: u32,
        block_dim: u32,
        /// Bytes of one fp16 tile buffer.
        half_bytes: u32,
        /// Bytes of one f32 tile buffer.
        float_bytes: u32,
        /// Bytes of ReduceSum's work buffer.
        work_bytes: u32,
        eps: f32,
        inv_cols: f32,
    }
);

tiling_struct!(
    /// SwiGLU over `total` elements, split over cores in 32-byte units.
    SwiGluTiling {
        total: u32,
        chunk: u32,
        per_core: u32,
        block_dim: u32,
        half_bytes: u32,
        float_bytes: u32,
    }
);

tiling_struct!(
    /// RoPE over `x [batch, heads, tokens, dim]`: a work item is one
    /// `(batch, token)` row of the tables and `heads_per_tile` heads.
    RopeTiling {
        batch: u32,
        heads: u32,
        tokens: u32,
        dim: u32,
        half: u32,
        /// `half` rounded up to 32 bytes of fp16: where the second half of
        /// a row starts in the UB.
        half_pad: u32,
        heads_per_tile: u32,
        head_groups: u32,
        items: u32,
        items_per_core: u32,
        block_dim: u32,
        x_tile_bytes: u32,
        table_half_bytes: u32,
        table_float_bytes: u32,
        temp_bytes: u32,
    }
);

tiling_struct!(
    /// Decode GEMV `y [n] = W [n, k] · x [k]`: tiles of `rows_per_tile`
    /// output rows, each row's dot product in `k_chunks` chunks of
    /// `k_chunk` when a row tile of full rows does not fit the UB.
    GemvTiling {
        k: u32,
        n: u32,
        rows_per_tile: u32,
        tiles: u32,
        tiles_per_core: u32,
        block_dim: u32,
        k_chunk: u32,
        k_chunks: u32,
        /// Weights per scale along K (`k` for fp16 and per-channel int8).
        group_size: u32,
        /// Scales per row.
        groups: u32,
        /// Scales a full K chunk spans.
        groups_per_chunk: u32,
        /// Weight bytes of one row in GM.
        w_row_bytes: u32,
        x_half_bytes: u32,
        x_float_bytes: u32,
        /// int4: bytes of each of x's even and odd halves, in f32.
        x_split_bytes: u32,
        /// Bytes between rows of a weight tile in the UB.
        w_pitch: u32,
        w_tile_bytes: u32,
        /// Bytes between rows of a scale (or min) tile in the UB.
        s_pitch: u32,
        s_tile_bytes: u32,
        /// Bytes of one dequantization buffer of fp16 / f32 (per K chunk).
        deq_half_bytes: u32,
        deq_float_bytes: u32,
        /// int4: bytes of the high nibbles as u8.
        deq_byte_bytes: u32,
        work_bytes: u32,
        acc_bytes: u32,
        out_bytes: u32,
    }
);

/// How a GEMV's weights are stored (the layouts of [`kiln_runtime::ir::quant`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "format")]
pub enum GemvWeights {
    /// `W [n, k]` fp16.
    Half,
    /// `q [n, k]` int8, `scale [n, 1]` fp16: `w = q · scale`.
    Int8,
    /// `q [n, k/2]` u4 pairs (element `2j` in the low nibble of byte `j`),
    /// `scale [n, G]` fp16 and, with `offset`, `min [n, G]` fp16: `w = q ·
    /// scale + min`, or `(q − 8) · scale` without.
    Int4 { group_size: usize, offset: bool },
}

impl GemvWeights {
    /// Weight bytes of `k` weights (`k` even for int4).
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            GemvWeights::Half => k * 2,
            GemvWeights::Int8 => k,
            GemvWeights::Int4 { .. } => k / 2,
        }
    }

    pub fn group_size(self, k: usize) -> usize {
        match self {
            GemvWeights::Int4 { group_size, .. } => group_size,
            _ => k,
        }
    }

    fn scale_tensors(self) -> usize {
        match self {
            GemvWeights::Half => 0,
            GemvWeights::Int8 | GemvWeights::Int4 { offset: false, .. } => 1,
            GemvWeights::Int4 { offset: true, .. } => 2,
        }
    }
}

fn u32_of(what: &str, v: usize) -> Result<u32, AscendcError> {
    u32::try_from(v).map_err(|_| AscendcError::Unsupported(format!("{what} = {v} exceeds 32 bits")))
}

fn check_budget(kernel: &str, total: usize, target: Target) -> Result<(), AscendcError> {
    if total > target.ub_budget() {
        return Err(AscendcError::Unsupported(format!(
            "{kernel}: {total} UB bytes needed, {} available on {target}",
            target.ub_budget()
        )));
    }
    Ok(())
}

/// Items split into contiguous ranges over at most `cores` cores:
/// `(items per core, cores used)`.
fn split(items: usize, cores: usize) -> (usize, usize) {
    let per_core = items.div_ceil(cores.max(1)).max(1);
    (per_core, items.div_ceil(per_core).max(1))
}

impl RmsNormTiling {
    /// UB bytes the kernel allocates for chunks of `chunk` elements.
    pub fn ub_total(chunk: usize, residual: bool) -> usize {
        let half = ub_bytes(chunk * 2);
        let float = ub_bytes(chunk * 4);
        let queues = if residual { 4 } else { 2 };
        BUFFER_NUM * half * queues + half + 3 * float + work_bytes(chunk) + BLOCK
    }

    pub fn plan(
        rows: usize,
        cols: usize,
        eps: f32,
        residual: bool,
        target: Target,
    ) -> Result<RmsNormTiling, AscendcError> {
        if rows == 0 || cols == 0 {
            return Err(AscendcError::Unsupported(
                "RMSNorm of an empty tensor".into(),
            ));
        }
        let budget = target.ub_budget();
        let chunk = if Self::ub_total(cols, residual) <= budget {
            cols
        } else {
            // The largest multiple of a repeat that fits.
            let mut chunk = F32_PER_REPEAT;
            while Self::ub_total(chunk + F32_PER_REPEAT, residual) <= budget {
                chunk += F32_PER_REPEAT;
            }
            chunk
        };
        check_budget("RMSNorm", Self::ub_total(chunk, residual), target)?;
        let chunks = cols.div_ceil(chunk);
        let (rows_per_core, block_dim) = split(rows, target.cores());
        Ok(RmsNormTiling {
            rows: u32_of("rows", rows)?,
            cols: u32_of("cols", cols)?,
            chunk: chunk as u32,
            chunks: chunks as u32,
            tail: (cols - (chunks - 1) * chunk) as u32,
            rows_per_core: rows_per_core as u32,
            block_dim: block_dim as u32,
            half_bytes: ub_bytes(chunk * 2) as u32,
            float_bytes: ub_bytes(chunk * 4) as u32,
            work_bytes: work_bytes(chunk) as u32,
            eps,
            inv_cols: 1.0 / cols as f32,
        })
    }

    /// GM bytes one call reads: the inputs (twice for chunked rows) and gamma
    /// (once per core, or per row and chunk when chunked).
    pub fn bytes_read(&self, residual: bool) -> u64 {
        let (rows, cols) = (self.rows as u64, self.cols as u64);
        let inputs = if residual { 2 } else { 1 };
        if self.chunks == 1 {
            inputs * rows * cols * 2 + self.block_dim as u64 * cols * 2
        } else {
            2 * inputs * rows * cols * 2 + rows * cols * 2
        }
    }
}

/// ReduceSum's work buffer: one f32 partial per repeat.
fn work_bytes(count: usize) -> usize {
    ub_bytes(count.div_ceil(F32_PER_REPEAT) * 4)
}

impl SwiGluTiling {
    pub fn ub_total(chunk: usize) -> usize {
        3 * BUFFER_NUM * ub_bytes(chunk * 2) + 2 * ub_bytes(chunk * 4)
    }

    pub fn plan(total: usize, target: Target) -> Result<SwiGluTiling, AscendcError> {
        if total == 0 {
            return Err(AscendcError::Unsupported(
                "SwiGLU of an empty tensor".into(),
            ));
        }
        // Cores take whole 32-byte units of fp16, so no two share a block.
        let unit = BLOCK / 2;
        let (units_per_core, block_dim) = split(total.div_ceil(unit), target.cores());
        let per_core = units_per_core * unit;
        let mut chunk = F32_PER_REPEAT;
        while chunk < per_core && Self::ub_total(chunk + F32_PER_REPEAT) <= target.ub_budget() {
            chunk += F32_PER_REPEAT;
        }
        let chunk = chunk.min(align_up(per_core, unit));
        check_budget("SwiGLU", Self::ub_total(chunk), target)?;
        Ok(SwiGluTiling {
            total: u32_of("elements", total)?,
            chunk: chunk as u32,
            per_core: u32_of("elements per core", per_core)?,
            block_dim: block_dim as u32,
            half_bytes: ub_bytes(chunk * 2) as u32,
            float_bytes: ub_bytes(chunk * 4) as u32,
        })
    }

    pub fn bytes_read(&self) -> u64 {
        2 * self.total as u64 * 2
    }
}

impl RopeTiling {
    fn ub_total(heads_per_tile: usize, half_pad: usize) -> usize {
        let x_tile = ub_bytes(heads_per_tile * 2 * half_pad * 2);
        2 * BUFFER_NUM * x_tile
            + 2 * ub_bytes(2 * half_pad * 2)
            + 2 * ub_bytes(2 * half_pad * 4)
            + 4 * ub_bytes(half_pad * 4)
    }

    pub fn plan(
        batch: usize,
        heads: usize,
        tokens: usize,
        dim: usize,
        target: Target,
    ) -> Result<RopeTiling, AscendcError> {
        if dim == 0 || !dim.is_multiple_of(2) || batch * heads * tokens == 0 {
            return Err(AscendcError::Unsupported(format!(
                "RoPE needs an even head dim and a non-empty x, got [{batch}, {heads}, {tokens}, {dim}]"
            )));
        }
        let half = dim / 2;
        let half_pad = align_up(half, BLOCK / 2);
        check_budget("RoPE (one head)", Self::ub_total(1, half_pad), target)?;
        // Enough items to occupy every core, as few as the UB allows.
        let rows = batch * tokens;
        let mut fit = heads;
        while Self::ub_total(fit, half_pad) > target.ub_budget() {
            fit -= 1;
        }
        let wanted = (rows * heads)
            .div_ceil(target.cores())
            .div_ceil(rows)
            .max(1);
        let heads_per_tile = wanted.min(fit);
        let head_groups = heads.div_ceil(heads_per_tile);
        let items = rows * head_groups;
        let (items_per_core, block_dim) = split(items, target.cores());
        Ok(RopeTiling {
            batch: u32_of("batch", batch)?,
            heads: u32_of("heads", heads)?,
            tokens: u32_of("tokens", tokens)?,
            dim: u32_of("dim", dim)?,
            half: half as u32,
            half_pad: half_pad as u32,
            heads_per_tile: heads_per_tile as u32,
            head_groups: head_groups as u32,
            items: u32_of("items", items)?,
            items_per_core: items_per_core as u32,
            block_dim: block_dim as u32,
            x_tile_bytes: ub_bytes(heads_per_tile * 2 * half_pad * 2) as u32,
            table_half_bytes: ub_bytes(2 * half_pad * 2) as u32,
            table_float_bytes: ub_bytes(2 * half_pad * 4) as u32,
            temp_bytes: ub_bytes(half_pad * 4) as u32,
        })
    }

    pub fn bytes_read(&self) -> u64 {
        let x = (self.batch * self.heads * self.tokens * self.dim) as u64 * 2;
        x + self.items as u64 * 2 * self.dim as u64 * 2
    }
}

/// The UB a GEMV takes for `rows` rows per tile and `kc` weights per K chunk.
struct GemvLayout {
    weights: GemvWeights,
    k: usize,
}

impl GemvLayout {
    fn groups_per_chunk(&self, kc: usize) -> usize {
        match self.weights {
            GemvWeights::Int4 { group_size, .. } => kc.div_ceil(group_size),
            _ => 1,
        }
    }

    fn sizes(&self, rows: usize, kc: usize) -> [usize; 11] {
        let k = self.k;
        let nibbles = matches!(self.weights, GemvWeights::Int4 { .. });
        let x_half = ub_bytes(k * 2);
        // For int4, x is also split into its even and odd elements.
        let x_float = ub_bytes(k * 4);
        let w_pitch = ub_bytes(self.weights.row_bytes(kc));
        let s_pitch = ub_bytes(self.groups_per_chunk(kc) * 2);
        let (deq_half, deq_float) = if nibbles {
            (ub_bytes(kc / 2 * 2), ub_bytes(kc / 2 * 4))
        } else {
            (ub_bytes(kc * 2), ub_bytes(kc * 4))
        };
        let work = work_bytes(kc);
        let acc = ub_bytes(rows * 4);
        let out = ub_bytes(rows * 2);
        [
            x_half,
            x_float,
            w_pitch,
            rows * w_pitch,
            s_pitch,
            rows * s_pitch,
            deq_half,
            deq_float,
            work,
            acc,
            out,
        ]
    }

    fn ub_total(&self, rows: usize, kc: usize) -> usize {
        let [x_half, x_float, _, w_tile, _, s_tile, deq_half, deq_float, work, acc, out] =
            self.sizes(rows, kc);
        let mut total = x_half + x_float + BUFFER_NUM * w_tile + work + BLOCK + acc;
        total += BUFFER_NUM * out;
        match self.weights {
            GemvWeights::Half => total += deq_float,
            GemvWeights::Int8 => total += deq_half + deq_float,
            GemvWeights::Int4 { .. } => {
                // xe and xo; bytes, hi (as half and u8), lo as half; lo and hi as f32.
                total +=
                    2 * ub_bytes(self.k / 2 * 4) + 4 * deq_half + ub_bytes(kc / 2) + 2 * deq_float;
            }
        }
        // Scale (and min) tiles, queued, and their f32 copies.
        total + self.weights.scale_tensors() * (BUFFER_NUM * s_tile + 2 * s_tile)
    }
}

impl GemvTiling {
    pub fn plan(
        k: usize,
        n: usize,
        weights: GemvWeights,
        target: Target,
    ) -> Result<GemvTiling, AscendcError> {
        if k == 0 || n == 0 {
            return Err(AscendcError::Unsupported("a GEMV with no weights".into()));
        }
        let group_size = weights.group_size(k);
        // K chunks stay whole groups (int4) or whole repeats of f32.
        let unit = match weights {
            GemvWeights::Int4 { group_size, .. } => {
                if !k.is_multiple_of(2) || !group_size.is_multiple_of(16) {
                    return Err(AscendcError::Unsupported(format!(
                        "int4 GEMV needs an even K and groups of a multiple of 16, got K = {k}, groups of {group_size}"
                    )));
                }
                group_size.max(F32_PER_REPEAT)
            }
            _ => F32_PER_REPEAT,
        };
        let layout = GemvLayout { weights, k };
        let budget = target.ub_budget();
        let min_rows = MIN_GEMV_ROWS.min(n);
        let k_chunk = if layout.ub_total(min_rows, k) <= budget {
            k
        } else {
            let mut kc = unit;
            while kc + unit < k && layout.ub_total(min_rows, kc + unit) <= budget {
                kc += unit;
            }
            kc
        };
        check_budget("GEMV", layout.ub_total(min_rows, k_chunk), target)?;
        // As many rows as fit, but enough tiles for every core.
        let wanted = n.div_ceil(target.cores()).min(MAX_GEMV_ROWS);
        let mut rows = wanted.max(min_rows);
        while rows > min_rows && layout.ub_total(rows, k_chunk) > budget {
            rows -= 1;
        }
        if rows >= 16 {
            rows -= rows % 16; // whole 32-byte blocks of fp16 output per tile
        }
        let tiles = n.div_ceil(rows);
        let (tiles_per_core, block_dim) = split(tiles, target.cores());
        let [x_half, x_float, w_pitch, w_tile, s_pitch, s_tile, deq_half, deq_float, work, acc, out] =
            layout.sizes(rows, k_chunk);
        Ok(GemvTiling {
            k: u32_of("K", k)?,
            n: u32_of("N", n)?,
            rows_per_tile: rows as u32,
            tiles: tiles as u32,
            tiles_per_core: tiles_per_core as u32,
            block_dim: block_dim as u32,
            k_chunk: k_chunk as u32,
            k_chunks: k.div_ceil(k_chunk) as u32,
            group_size: u32_of("group size", group_size)?,
            groups: k.div_ceil(group_size) as u32,
            groups_per_chunk: layout.groups_per_chunk(k_chunk) as u32,
            w_row_bytes: u32_of("row bytes", weights.row_bytes(k))?,
            x_half_bytes: x_half as u32,
            x_float_bytes: x_float as u32,
            x_split_bytes: ub_bytes(k / 2 * 4) as u32,
            w_pitch: w_pitch as u32,
            w_tile_bytes: u32_of("weight tile bytes", w_tile)?,
            s_pitch: s_pitch as u32,
            s_tile_bytes: s_tile as u32,
            deq_half_bytes: deq_half as u32,
            deq_float_bytes: deq_float as u32,
            deq_byte_bytes: ub_bytes(k_chunk / 2) as u32,
            work_bytes: work as u32,
            acc_bytes: acc as u32,
            out_bytes: out as u32,
        })
    }

    /// The UB bytes the kernel allocates with this tiling.
    pub fn ub_total(&self, weights: GemvWeights) -> usize {
        GemvLayout {
            weights,
            k: self.k as usize,
        }
        .ub_total(self.rows_per_tile as usize, self.k_chunk as usize)
    }

    /// GM bytes one call reads: x once per core, every weight, scale and min.
    pub fn bytes_read(&self, weights: GemvWeights) -> u64 {
        let (k, n) = (self.k as u64, self.n as u64);
        let scales = weights.scale_tensors() as u64 * n * self.groups as u64 * 2;
        self.block_dim as u64 * k * 2 + n * self.w_row_bytes as u64 + scales
    }
}

/// Output columns `[start, end)` of each call a GEMV of `n` outputs is split
/// into: whole row tiles, at most [`MAX_GEMV_CHUNK_WEIGHT_BYTES`] of
/// weights each, so that `lm_head` becomes a few calls (and a few weight
/// initializers) rather than one.
pub fn gemv_column_chunks(
    k: usize,
    n: usize,
    weights: GemvWeights,
    target: Target,
) -> Result<Vec<std::ops::Range<usize>>, AscendcError> {
    let tiling = GemvTiling::plan(k, n, weights, target)?;
    let rows = tiling.rows_per_tile as usize;
    let tile_bytes = rows * weights.row_bytes(k);
    let tiles_per_chunk = (MAX_GEMV_CHUNK_WEIGHT_BYTES / tile_bytes.max(1)).max(1);
    let cols = tiles_per_chunk * rows;
    Ok((0..n)
        .step_by(cols)
        .map(|start| start..(start + cols).min(n))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_chunks_rows_longer_than_the_ub() {
        let t = RmsNormTiling::plan(4, 576, 1e-5, false, Target::Ascend310b).unwrap();
        assert_eq!((t.chunks, t.chunk, t.tail, t.block_dim), (1, 576, 576, 1));
        let long = RmsNormTiling::plan(3, 20_011, 1e-5, true, Target::Ascend310b).unwrap();
        assert!(long.chunks > 1 && long.chunk.is_multiple_of(64));
        assert_eq!(
            (long.chunks - 1) * long.chunk + long.tail,
            20_011,
            "{long:?}"
        );
        assert!(
            RmsNormTiling::ub_total(long.chunk as usize, true) <= Target::Ascend310b.ub_budget()
        );
    }

    #[test]
    fn the_910b_splits_over_cores_and_the_310b_does_not() {
        let t = RmsNormTiling::plan(100, 64, 1e-6, false, Target::Ascend910b).unwrap();
        assert_eq!((t.rows_per_core, t.block_dim), (3, 34));
        let s = SwiGluTiling::plan(1000, Target::Ascend910b).unwrap();
        assert_eq!(s.per_core % 16, 0);
        assert!(s.per_core * s.block_dim >= 1000 && s.per_core * (s.block_dim - 1) < 1000);
        assert_eq!(
            SwiGluTiling::plan(1000, Target::Ascend310b)
                .unwrap()
                .block_dim,
            1
        );
        let g = GemvTiling::plan(576, 1536, GemvWeights::Half, Target::Ascend910b).unwrap();
        assert!(g.block_dim > 1 && g.block_dim <= 40, "{g:?}");
    }

    #[test]
    fn gemv_chunks_k_when_rows_do_not_fit_and_splits_wide_outputs() {
        let w = GemvWeights::Int4 {
            group_size: 32,
            offset: true,
        };
        let t = GemvTiling::plan(13_312, 64, w, Target::Ascend310b).unwrap();
        assert!(t.k_chunks > 1 && t.k_chunk.is_multiple_of(64), "{t:?}");
        assert!(t.ub_total(w) <= Target::Ascend310b.ub_budget());
        let chunks =
            gemv_column_chunks(576, 49_152, GemvWeights::Half, Target::Ascend310b).unwrap();
        assert!(chunks.len() >= 2);
        assert_eq!(chunks.last().unwrap().end, 49_152);
        assert!(chunks.windows(2).all(|p| p[0].end == p[1].start));
    }

    #[test]
    fn fields_are_four_bytes_in_declaration_order() {
        let t = SwiGluTiling::plan(40, Target::Ascend310b).unwrap();
        let f = t.fields();
        assert_eq!(f[0].name, "total");
        assert_eq!(f[0].word, 40);
        let r = RmsNormTiling::plan(1, 8, 1e-6, false, Target::Ascend310b).unwrap();
        let eps = r.fields().into_iter().find(|f| f.name == "eps").unwrap();
        assert_eq!(f32::from_bits(eps.word), 1e-6);
        assert_eq!(eps.c_type, "float");
    }
}
