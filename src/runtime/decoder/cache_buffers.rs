//! The memory of a KV cache written in place (`shared_cache`): for each key and value of each
//! layer a buffer `[slots, heads, capacity, head_dim]`, of which a run binds the first `rows`
//! slots. Rows that join a batch are copied into free slots and a leaving row's slot is refilled
//! by moving a later row down, so the rows that stay where they are are never copied.
//!
//! In host memory a batch's buffers are one allocation, zeroed by the allocator
//! (`alloc_zeroed`): a large one is mapped on demand, so slots and columns no row has reached
//! cost no resident memory. In GPU memory each buffer is an ONNX Runtime tensor of exactly the
//! batch's rows, rearranged through the host when rows join or leave.

use half::f16;
use half::slice::HalfFloatSliceExt;
use ort::AsPointer;
use ort::memory::{AllocationDevice, Allocator, MemoryInfo};
use ort::session::IoBinding;
use ort::value::{DynTensor, TensorElementType};

use crate::runtime::bindings::StatePair;
use crate::runtime::step::RunError;

/// One row's cached columns going from slot `from` of a source to slot `to` of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMove {
    pub from: usize,
    pub to: usize,
    pub columns: usize,
}

/// The buffers of one batch.
pub struct CacheBuffers {
    storage: Storage,
    /// `(heads, head_dim)` of each buffer, in `bindings.state` order.
    layouts: Vec<(usize, usize)>,
    slots: usize,
    capacity: usize,
}

enum Storage {
    HostF32(Vec<f32>),
    /// float16 values as their bits: `alloc_zeroed` serves primitive integers, and the zero
    /// bits are float16's zero.
    HostF16(Vec<u16>),
    /// One tensor per buffer in a GPU's memory, of exactly `slots` rows.
    Device(Vec<DynTensor>),
}

/// Element types whose zero is all zero bytes, so zeroed memory holds zeros of them.
trait ZeroBits: Copy {}
impl ZeroBits for f32 {}
impl ZeroBits for u16 {}

/// `len` zeros from `alloc_zeroed`, which takes a large allocation straight from the kernel's
/// zeroed pages, so that pages nothing writes stay unbacked; `None` where the allocator refuses.
fn zeroed<W: ZeroBits>(len: usize) -> Option<Vec<W>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<W>(len).ok()?;
    // SAFETY: `layout` has a non-zero size. The memory is `len` zeroed `W`s, which `ZeroBits`
    // makes valid zeros, and the Vec takes it over with the layout it was allocated with.
    unsafe {
        let data = std::alloc::alloc_zeroed(layout).cast::<W>();
        (!data.is_null()).then(|| Vec::from_raw_parts(data, len, len))
    }
}

/// A host buffer's words, of either element type.
enum Words<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl CacheBuffers {
    /// Zeroed host buffers of `slots` rows and `capacity` columns, or an error naming their
    /// size where the host cannot give that much memory (a request must not abort the server).
    pub fn host(
        element: TensorElementType,
        layouts: &[(usize, usize)],
        slots: usize,
        capacity: usize,
    ) -> Result<Self, RunError> {
        let width = if element == TensorElementType::Float16 {
            2
        } else {
            4
        };
        let len = layouts.iter().try_fold(0_usize, |len, &(heads, dim)| {
            len.checked_add(
                slots
                    .checked_mul(heads)?
                    .checked_mul(capacity)?
                    .checked_mul(dim)?,
            )
        });
        let storage = len.and_then(|len| match element {
            TensorElementType::Float16 => zeroed(len).map(Storage::HostF16),
            _ => zeroed(len).map(Storage::HostF32),
        });
        let Some(storage) = storage else {
            let mib = len.map_or(u128::MAX, |len| (len as u128 * width) >> 20);
            return Err(ort::Error::new(format!(
                "cannot allocate {mib} MiB for a KV cache of {slots} rows of {capacity} columns"
            ))
            .into());
        };
        Ok(Self {
            storage,
            layouts: layouts.to_vec(),
            slots,
            capacity,
        })
    }

    /// Buffers of exactly `rows` rows from `allocator`, a GPU's, left as the device had them: a
    /// run reads only the columns it or a copy has written.
    pub fn device(
        allocator: &Allocator,
        element: TensorElementType,
        layouts: &[(usize, usize)],
        rows: usize,
        capacity: usize,
    ) -> Result<Self, RunError> {
        let tensors = layouts
            .iter()
            .map(|&(heads, dim)| DynTensor::new(allocator, element, [rows, heads, capacity, dim]))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            storage: Storage::Device(tensors),
            layouts: layouts.to_vec(),
            slots: rows,
            capacity,
        })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether rows can be moved between these buffers' slots where they are.
    pub fn in_host_memory(&self) -> bool {
        !matches!(self.storage, Storage::Device(_))
    }

    /// Binds the first `rows` slots of each buffer as both the graph's past input and its
    /// present output, so the graph writes the new columns in place. The binding then refers to
    /// this memory: it must be dropped before the buffers are (`SharedCacheDecoder::run` drops
    /// it, and the run's outputs, before it returns).
    pub fn bind(
        &mut self,
        binding: &mut IoBinding,
        pairs: &[StatePair],
        rows: usize,
    ) -> Result<(), RunError> {
        if let Storage::Device(tensors) = &mut self.storage {
            debug_assert_eq!(rows, self.slots, "device buffers hold exactly the batch");
            for (pair, tensor) in pairs.iter().zip(tensors) {
                binding.bind_input(&pair.input, &*tensor)?;
                binding.bind_output(&pair.output, &mut *tensor)?;
            }
            return Ok(());
        }
        for (index, pair) in pairs.iter().enumerate() {
            let mut view = self.host_view(index, rows)?;
            binding.bind_input(&pair.input, &view.tensor)?;
            binding.bind_output(&pair.output, &mut view.tensor)?;
        }
        Ok(())
    }

    /// Copies rows of `source` (in host or GPU memory) into these host buffers' slots.
    pub fn copy_rows_from(
        &mut self,
        source: &CacheBuffers,
        moves: &[RowMove],
    ) -> Result<(), RunError> {
        let (to_capacity, to_slots) = (self.capacity, self.slots);
        let (from_capacity, from_slots) = (source.capacity, source.slots);
        for (index, &layout) in self.layouts.iter().enumerate() {
            let plan = CopyPlan {
                layout,
                from_capacity,
                to_capacity,
                moves,
            };
            let start = self.start(index);
            let target = start..start + to_slots * plan.row_len(to_capacity);
            let from_len = from_slots * plan.row_len(from_capacity);
            source.with_words(index, source.start(index), from_len, |words| {
                match (&mut self.storage, words) {
                    (Storage::HostF32(to), Words::F32(from)) => plan.copy(&mut to[target], from),
                    (Storage::HostF16(to), Words::F16(from)) => plan.copy(&mut to[target], from),
                    _ => unreachable!("rows are copied between host buffers of one element type"),
                }
            })?;
        }
        Ok(())
    }

    /// Moves rows down within these host buffers: each move's `from` is past its `to`, and
    /// moves go in increasing order, so no row is overwritten before it has moved.
    pub fn move_rows_down(&mut self, moves: &[RowMove]) {
        let capacity = self.capacity;
        for (index, &layout) in self.layouts.iter().enumerate() {
            let plan = CopyPlan {
                layout,
                from_capacity: capacity,
                to_capacity: capacity,
                moves,
            };
            let start = self.start(index);
            let region = start..start + self.slots * plan.row_len(capacity);
            match &mut self.storage {
                Storage::HostF32(words) => plan.move_down(&mut words[region]),
                Storage::HostF16(words) => plan.move_down(&mut words[region]),
                Storage::Device(_) => unreachable!("rows move in place in host memory only"),
            }
        }
    }

    /// These host buffers copied into the memory of CUDA device `device`.
    pub fn upload(mut self, device: i32) -> Result<CacheBuffers, RunError> {
        let tensors = (0..self.layouts.len())
            .map(|index| {
                let view = self.host_view(index, self.slots)?;
                Ok(view.tensor.to(AllocationDevice::CUDA, device)?)
            })
            .collect::<Result<_, RunError>>()?;
        Ok(CacheBuffers {
            storage: Storage::Device(tensors),
            layouts: self.layouts,
            slots: self.slots,
            capacity: self.capacity,
        })
    }

    /// A tensor over the first `rows` slots of host buffer `index`.
    fn host_view(&mut self, index: usize, rows: usize) -> Result<ViewOf<'_>, RunError> {
        let (heads, dim) = self.layouts[index];
        let start = self.start(index);
        let shape = [rows, heads, self.capacity, dim];
        match &mut self.storage {
            Storage::HostF32(words) => view(words, start, TensorElementType::Float32, shape),
            Storage::HostF16(words) => view(words, start, TensorElementType::Float16, shape),
            Storage::Device(_) => unreachable!("views are of host memory"),
        }
    }

    /// Where buffer `index` starts in a host allocation: after the buffers before it.
    fn start(&self, index: usize) -> usize {
        self.layouts[..index]
            .iter()
            .map(|&(heads, dim)| self.slots * heads * self.capacity * dim)
            .sum()
    }

    /// Runs `read` on buffer `index`'s words, `len` of them from `start` in host memory, or a
    /// host copy of its tensor on a GPU.
    fn with_words(
        &self,
        index: usize,
        start: usize,
        len: usize,
        read: impl FnOnce(Words<'_>),
    ) -> Result<(), RunError> {
        match &self.storage {
            Storage::HostF32(words) => read(Words::F32(&words[start..start + len])),
            Storage::HostF16(words) => read(Words::F16(&words[start..start + len])),
            Storage::Device(tensors) => {
                let host = tensors[index].to(AllocationDevice::CPU, 0)?;
                match *host.data_type() {
                    TensorElementType::Float16 => read(Words::F16(
                        host.try_extract_tensor::<f16>()?.1.reinterpret_cast(),
                    )),
                    _ => read(Words::F32(host.try_extract_tensor::<f32>()?.1)),
                }
            }
        }
        Ok(())
    }
}

/// A tensor of `shape` over `words[start..]`, which ONNX Runtime reads and writes where it is.
///
/// ort's tensors over borrowed memory (`TensorRefMut::from_raw`) are copied when bound as an
/// input, which would make the graph write its new columns into the copy; so the tensor is made
/// through the C API and held as a value ort may bind as it is. The returned value borrows
/// `words` mutably: the memory outlives it, and nothing else touches it meanwhile.
fn view<W>(
    words: &mut [W],
    start: usize,
    element: TensorElementType,
    shape: [usize; 4],
) -> Result<ViewOf<'_>, RunError> {
    let len: usize = shape.iter().product();
    assert!(start + len <= words.len(), "a view stays inside its buffer");
    let data = words[start..].as_mut_ptr().cast::<std::ffi::c_void>();
    let dims = shape.map(|dim| dim as i64);
    let api = ort::api();
    let memory = MemoryInfo::default();
    let mut value = std::ptr::null_mut();
    // SAFETY: `data` points at `len` elements of `W`, each one element of `element` (the
    // callers pair `f32` words with float32 and `u16` words with float16), inside `words`.
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            memory.ptr(),
            data,
            len * size_of::<W>(),
            dims.as_ptr(),
            dims.len(),
            element.into(),
            &mut value,
        )
    };
    if !status.0.is_null() {
        // SAFETY: a non-null status is a live OrtStatus, read once and released here.
        let message = unsafe {
            let text = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0));
            let message = text.to_string_lossy().into_owned();
            (api.ReleaseStatus)(status.0);
            message
        };
        return Err(ort::Error::new(message).into());
    }
    let value = std::ptr::NonNull::new(value).expect("ONNX Runtime returned a tensor");
    // SAFETY: `value` is a tensor just created over host memory; the default allocator is the
    // host's, and releasing the value leaves `words` to their owner.
    let tensor = unsafe { DynTensor::from_ptr(value, Some(&Allocator::default())) };
    Ok(ViewOf {
        tensor,
        _words: std::marker::PhantomData,
    })
}

/// A tensor over memory it borrows mutably.
struct ViewOf<'a> {
    tensor: DynTensor,
    _words: std::marker::PhantomData<&'a mut ()>,
}

/// Which rows to copy between two buffers of one layout.
struct CopyPlan<'a> {
    /// `(heads, head_dim)`.
    layout: (usize, usize),
    from_capacity: usize,
    to_capacity: usize,
    moves: &'a [RowMove],
}

impl CopyPlan<'_> {
    /// Words one slot takes at `capacity` columns.
    fn row_len(&self, capacity: usize) -> usize {
        self.layout.0 * capacity * self.layout.1
    }

    fn copy<T: Copy>(&self, target: &mut [T], source: &[T]) {
        let (heads, dim) = self.layout;
        for row in self.moves {
            let len = row.columns * dim;
            for head in 0..heads {
                let read = (row.from * heads + head) * self.from_capacity * dim;
                let write = (row.to * heads + head) * self.to_capacity * dim;
                target[write..write + len].copy_from_slice(&source[read..read + len]);
            }
        }
    }

    fn move_down<T: Copy>(&self, words: &mut [T]) {
        let (heads, dim) = self.layout;
        let capacity = self.to_capacity;
        for row in self.moves {
            debug_assert!(row.from > row.to, "rows move down");
            let len = row.columns * dim;
            for head in 0..heads {
                let read = (row.from * heads + head) * capacity * dim;
                let write = (row.to * heads + head) * capacity * dim;
                words.copy_within(read..read + len, write);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills every slot's columns with `slot * 100 + head * 10 + column`.
    fn numbered(slots: usize, capacity: usize) -> CacheBuffers {
        let mut buffers =
            CacheBuffers::host(TensorElementType::Float32, &[(2, 1)], slots, capacity).unwrap();
        let Storage::HostF32(words) = &mut buffers.storage else {
            unreachable!()
        };
        for slot in 0..slots {
            for head in 0..2 {
                for column in 0..capacity {
                    words[(slot * 2 + head) * capacity + column] =
                        (slot * 100 + head * 10 + column) as f32;
                }
            }
        }
        buffers
    }

    fn slot(buffers: &CacheBuffers, slot: usize, head: usize) -> Vec<f32> {
        let Storage::HostF32(words) = &buffers.storage else {
            unreachable!()
        };
        let start = (slot * 2 + head) * buffers.capacity;
        words[start..start + buffers.capacity].to_vec()
    }

    #[test]
    fn memory_the_host_cannot_give_is_an_error_not_an_abort() {
        let error = CacheBuffers::host(
            TensorElementType::Float32,
            &[(1 << 16, 1 << 10)],
            1 << 16,
            1 << 10,
        )
        .err()
        .expect("no host has that much memory");
        assert!(
            error
                .to_string()
                .contains("MiB for a KV cache of 65536 rows"),
            "{error}"
        );
    }

    #[test]
    fn joining_rows_land_in_free_slots_with_their_own_columns() {
        // Two source rows of 3 columns, copied into slots 2 and 3 of 5-column buffers.
        let source = numbered(2, 3);
        let mut target = CacheBuffers::host(TensorElementType::Float32, &[(2, 1)], 4, 5).unwrap();
        let moves = [
            RowMove {
                from: 1,
                to: 2,
                columns: 2,
            },
            RowMove {
                from: 0,
                to: 3,
                columns: 3,
            },
        ];
        target.copy_rows_from(&source, &moves).unwrap();
        assert_eq!(slot(&target, 2, 1), [110., 111., 0., 0., 0.]);
        assert_eq!(slot(&target, 3, 0), [0., 1., 2., 0., 0.]);
        assert_eq!(slot(&target, 0, 0), [0.; 5], "other slots untouched");
    }

    #[test]
    fn rows_move_down_over_the_slots_of_rows_that_left() {
        // Rows 0 and 2 leave; 1, 3 and 4 go on in slots 0, 1 and 2.
        let mut buffers = numbered(5, 3);
        let moves = [
            RowMove {
                from: 1,
                to: 0,
                columns: 3,
            },
            RowMove {
                from: 3,
                to: 1,
                columns: 3,
            },
            RowMove {
                from: 4,
                to: 2,
                columns: 2,
            },
        ];
        buffers.move_rows_down(&moves);
        assert_eq!(slot(&buffers, 0, 1), [110., 111., 112.]);
        assert_eq!(slot(&buffers, 1, 0), [300., 301., 302.]);
        assert_eq!(slot(&buffers, 2, 1)[..2], [410., 411.]);
    }
}
