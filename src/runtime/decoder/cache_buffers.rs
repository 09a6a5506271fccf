//! The memory of a KV cache written in place (`shared_cache`): for each key and value of each
//! layer a buffer `[slots, heads, capacity, head_dim]`, of which a run binds the first `rows`
//! slots. In host memory, rows that join a batch are copied into free slots and a leaving row's
//! slot is refilled by moving a later row down, so the rows that stay where they are are never
//! copied.
//!
//! In host memory a batch's buffers are one allocation, zeroed by the allocator
//! (`alloc_zeroed`): a large one is mapped on demand, so slots and columns no row has reached
//! yet cost no resident memory. In GPU memory each buffer is an ONNX Runtime tensor of exactly
//! the batch's rows, laid out anew through the host whenever rows join or leave or a row
//! outgrows the capacity.

use half::f16;
use ort::AsPointer;
use ort::memory::{Allocator, MemoryInfo};
use ort::session::{IoBinding, Session, SessionOutputs};
use ort::value::{DynTensor, PrimitiveTensorElementType, TensorElementType};

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
    HostF16(Vec<f16>),
    /// One tensor per buffer in a GPU's memory, of exactly `slots` rows.
    Device(Vec<DynTensor>),
}

/// An element type a cache's host memory holds.
///
/// # Safety
/// All-zero bytes must be a valid value of the type (`zeroed` hands out zeroed memory as
/// values), and `TYPE` must be the type's ONNX element type, of the same size.
unsafe trait HostElement: PrimitiveTensorElementType + Copy + std::fmt::Debug {
    const TYPE: TensorElementType;
}

// SAFETY: zero bytes are 0.0 in both, and both are the ONNX types of their size.
unsafe impl HostElement for f32 {
    const TYPE: TensorElementType = TensorElementType::Float32;
}
unsafe impl HostElement for f16 {
    const TYPE: TensorElementType = TensorElementType::Float16;
}

/// `len` zeros from `alloc_zeroed`, which takes a large allocation straight from the kernel's
/// zeroed pages, so that pages nothing writes stay unbacked; `None` where the allocator refuses.
fn zeroed<W: HostElement>(len: usize) -> Option<Vec<W>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<W>(len).ok()?;
    // SAFETY: `layout` has a non-zero size. The memory is `len` zeroed `W`s, which `HostElement`
    // makes valid values, and the Vec takes it over with the layout it was allocated with.
    unsafe {
        let data = std::alloc::alloc_zeroed(layout).cast::<W>();
        (!data.is_null()).then(|| Vec::from_raw_parts(data, len, len))
    }
}

/// A host buffer's values, of either element type.
enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
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
        let len = layouts.iter().try_fold(0_usize, |len, &(heads, dim)| {
            len.checked_add(
                slots
                    .checked_mul(heads)?
                    .checked_mul(capacity)?
                    .checked_mul(dim)?,
            )
        });
        let storage = match element {
            TensorElementType::Float32 => len.and_then(zeroed).map(Storage::HostF32),
            TensorElementType::Float16 => len.and_then(zeroed).map(Storage::HostF16),
            other => {
                return Err(ort::Error::new(format!(
                    "a cache written in place is float32 or float16, not {other:?}"
                ))
                .into());
            }
        };
        let Some(storage) = storage else {
            // In u128: a request past the address space is reported, not overflowed.
            let width = element.byte_size(1).unwrap_or(0) as u128;
            return Err(RunError::CacheMemory {
                mib: len.map_or(u128::MAX, |len| (len as u128 * width) >> 20),
                rows: slots,
                columns: capacity,
            });
        };
        Ok(Self {
            storage,
            layouts: layouts.to_vec(),
            slots,
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

    /// Runs `session` on `binding` (its other inputs bound) with the first `rows` slots of
    /// each buffer bound as both the graph's past input and its present output, so the graph
    /// writes the new columns in place, and hands the outputs to `read`. The binding and the
    /// outputs refer to this memory, so they end here, before the buffers can change.
    pub fn run<R>(
        &mut self,
        session: &mut Session,
        mut binding: IoBinding,
        pairs: &[StatePair],
        rows: usize,
        read: impl FnOnce(&SessionOutputs<'_>) -> Result<R, RunError>,
    ) -> Result<R, RunError> {
        if let Storage::Device(tensors) = &mut self.storage {
            debug_assert_eq!(rows, self.slots, "device buffers hold exactly the batch");
            for (pair, tensor) in pairs.iter().zip(tensors) {
                binding.bind_input(&pair.input, &*tensor)?;
                binding.bind_output(&pair.output, &mut *tensor)?;
            }
        } else {
            for (index, pair) in pairs.iter().enumerate() {
                // SAFETY: the view and the binding that holds it end with this call, while
                // `self` (and so the memory) is borrowed mutably.
                let mut view = unsafe { self.host_view(index, rows)? };
                binding.bind_input(&pair.input, &view)?;
                binding.bind_output(&pair.output, &mut view)?;
            }
        }
        let outputs = session.run_binding(&binding)?;
        read(&outputs)
    }

    /// Copies rows of `source` (in host or GPU memory) into these host buffers' slots.
    pub fn copy_rows_from(
        &mut self,
        source: &CacheBuffers,
        moves: &[RowMove],
    ) -> Result<(), RunError> {
        for (index, &layout) in self.layouts.iter().enumerate() {
            let plan = CopyPlan {
                layout,
                from_capacity: source.capacity,
                to_capacity: self.capacity,
                moves,
            };
            let target = self.region(index);
            source.with_values(index, |values| match (&mut self.storage, values) {
                (Storage::HostF32(to), Values::F32(from)) => plan.copy(&mut to[target], from),
                (Storage::HostF16(to), Values::F16(from)) => plan.copy(&mut to[target], from),
                _ => unreachable!("rows are copied into host buffers of their element type"),
            })?;
        }
        Ok(())
    }

    /// Moves rows down within these host buffers: each move's `from` is past its `to`, and
    /// moves go in increasing order, so no row is overwritten before it has moved.
    pub fn move_rows_down(&mut self, moves: &[RowMove]) {
        for (index, &layout) in self.layouts.iter().enumerate() {
            let plan = CopyPlan {
                layout,
                from_capacity: self.capacity,
                to_capacity: self.capacity,
                moves,
            };
            let region = self.region(index);
            match &mut self.storage {
                Storage::HostF32(values) => plan.move_down(&mut values[region]),
                Storage::HostF16(values) => plan.move_down(&mut values[region]),
                Storage::Device(_) => unreachable!("rows move in place in host memory only"),
            }
        }
    }

    /// These host buffers copied into GPU memory from `allocator` (the session's own, so the
    /// cache stays in the pool the session allocates from).
    pub fn upload(mut self, allocator: &Allocator) -> Result<CacheBuffers, RunError> {
        let element = match self.storage {
            Storage::HostF16(_) => TensorElementType::Float16,
            _ => TensorElementType::Float32,
        };
        let mut tensors = Vec::with_capacity(self.layouts.len());
        for (index, &(heads, dim)) in self.layouts.clone().iter().enumerate() {
            let shape = [self.slots, heads, self.capacity, dim];
            let mut tensor = DynTensor::new(allocator, element, shape)?;
            // SAFETY: the view ends with this iteration, while `self` is borrowed mutably.
            let view = unsafe { self.host_view(index, self.slots)? };
            view.copy_into(&mut tensor)?;
            tensors.push(tensor);
        }
        Ok(CacheBuffers {
            storage: Storage::Device(tensors),
            layouts: self.layouts,
            slots: self.slots,
            capacity: self.capacity,
        })
    }

    /// Where buffer `index` lies in a host allocation: after the buffers before it.
    fn region(&self, index: usize) -> std::ops::Range<usize> {
        let len = |&(heads, dim): &(usize, usize)| self.slots * heads * self.capacity * dim;
        let start = self.layouts[..index].iter().map(len).sum();
        start..start + len(&self.layouts[index])
    }

    /// Runs `read` on buffer `index`'s values, in host memory or in a host copy of its tensor
    /// on a GPU.
    fn with_values(&self, index: usize, read: impl FnOnce(Values<'_>)) -> Result<(), RunError> {
        match &self.storage {
            Storage::HostF32(values) => read(Values::F32(&values[self.region(index)])),
            Storage::HostF16(values) => read(Values::F16(&values[self.region(index)])),
            Storage::Device(tensors) => {
                let host = tensors[index].to(ort::memory::AllocationDevice::CPU, 0)?;
                match *host.data_type() {
                    TensorElementType::Float16 => {
                        read(Values::F16(host.try_extract_tensor::<f16>()?.1))
                    }
                    _ => read(Values::F32(host.try_extract_tensor::<f32>()?.1)),
                }
            }
        }
        Ok(())
    }

    /// A tensor over the first `rows` slots of host buffer `index`, which ONNX Runtime reads
    /// and writes where it is.
    ///
    /// # Safety
    /// The tensor points into `self`'s memory without borrowing it: it, and anything that
    /// holds it (a binding, a run's outputs), must be dropped before `self` changes or drops.
    unsafe fn host_view(&mut self, index: usize, rows: usize) -> Result<DynTensor, RunError> {
        let (heads, dim) = self.layouts[index];
        let shape = [rows, heads, self.capacity, dim];
        let start = self.region(index).start;
        match &mut self.storage {
            // SAFETY: passed on to the caller.
            Storage::HostF32(values) => unsafe { view(&mut values[start..], shape) },
            Storage::HostF16(values) => unsafe { view(&mut values[start..], shape) },
            Storage::Device(_) => unreachable!("views are of host memory"),
        }
    }
}

/// A tensor of `shape` over the start of `values`.
///
/// ort's tensors over borrowed memory (`TensorRefMut::from_raw`) are copied when bound as an
/// input, which would make the graph write its new columns into the copy; so the tensor is made
/// through the C API and held as a value ort binds as it is.
///
/// # Safety
/// The returned tensor points into `values` without borrowing them: it must be dropped before
/// they are moved, changed or freed.
unsafe fn view<W: HostElement>(values: &mut [W], shape: [usize; 4]) -> Result<DynTensor, RunError> {
    let len: usize = shape.iter().product();
    assert!(len <= values.len(), "a view stays inside its buffer");
    let dims = shape.map(|dim| dim as i64);
    let api = ort::api();
    let memory = MemoryInfo::default();
    let mut value = std::ptr::null_mut();
    // SAFETY: the data is `len` values of `W`, whose ONNX type is `W::TYPE`, all inside `values`.
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            memory.ptr(),
            values.as_mut_ptr().cast(),
            len * size_of::<W>(),
            dims.as_ptr(),
            dims.len(),
            W::TYPE.into(),
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
    // host's, and releasing the value leaves the memory to its owner.
    Ok(unsafe { DynTensor::from_ptr(value, Some(&Allocator::default())) })
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

    fn move_down<T: Copy>(&self, values: &mut [T]) {
        let (heads, dim) = self.layout;
        let capacity = self.to_capacity;
        for row in self.moves {
            debug_assert!(row.from > row.to, "rows move down");
            let len = row.columns * dim;
            for head in 0..heads {
                let read = (row.from * heads + head) * capacity * dim;
                let write = (row.to * heads + head) * capacity * dim;
                values.copy_within(read..read + len, write);
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
        let Storage::HostF32(values) = &mut buffers.storage else {
            unreachable!()
        };
        for slot in 0..slots {
            for head in 0..2 {
                for column in 0..capacity {
                    values[(slot * 2 + head) * capacity + column] =
                        (slot * 100 + head * 10 + column) as f32;
                }
            }
        }
        buffers
    }

    fn slot(buffers: &CacheBuffers, slot: usize, head: usize) -> Vec<f32> {
        let Storage::HostF32(values) = &buffers.storage else {
            unreachable!()
        };
        let start = (slot * 2 + head) * buffers.capacity;
        values[start..start + buffers.capacity].to_vec()
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
