//! The wgpu side: device setup, the mesh pipeline that draws epaint's tessellated
//! shapes and text, the heatmap color-map pipeline, the block-reduction compute
//! pipeline, and read-back of the rendered image.

use crate::colormap;
use crate::image::RgbaImage;
use crate::reduce::{block_range, ReduceMode};
use crate::{Colormap, VizError};
use epaint::{ClippedPrimitive, Primitive};
use std::sync::{Arc, Mutex};

const TARGET_FORMAT: wgpu::TextureFormat = wgpu::TextureFormat::Rgba8Unorm;

/// Owns the wgpu device and the pipelines; create once and reuse for many charts.
///
/// All `render_*` methods take `&self`; the font cache is behind a mutex, so one
/// renderer can be shared between threads (renders then run one after the other).
pub struct Renderer {
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter_name: String,
    max_chunk_bytes: u64,
    mesh_pipeline: wgpu::RenderPipeline,
    mesh_bgl: wgpu::BindGroupLayout,
    sampler: wgpu::Sampler,
    heat_pipeline: wgpu::RenderPipeline,
    heat_bgl: wgpu::BindGroupLayout,
    reduce_pipeline: wgpu::ComputePipeline,
    reduce_bgl: wgpu::BindGroupLayout,
    lut_viridis: wgpu::Buffer,
    lut_magma: wgpu::Buffer,
    pub(crate) fonts: Mutex<epaint::Fonts>,
}

/// A reduced heatmap image living on the GPU, drawn color-mapped into `rect_px`.
pub(crate) struct HeatLayer {
    pub values: wgpu::Buffer,
    pub img_w: u32,
    pub img_h: u32,
    /// x, y, w, h in physical pixels
    pub rect_px: [u32; 4],
    pub vmin: f32,
    pub vmax: f32,
    pub colormap: Colormap,
}

/// Everything one chart needs drawn: tessellated primitives in points plus an optional
/// GPU heatmap layer (drawn first, under the meshes).
pub(crate) struct Frame {
    pub width_px: u32,
    pub height_px: u32,
    pub scale: f32,
    pub primitives: Vec<ClippedPrimitive>,
    pub atlas: epaint::ColorImage,
    pub heat: Option<HeatLayer>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ReduceParams {
    rows: u32,
    cols: u32,
    out_w: u32,
    out_h: u32,
    mode: u32,
    out_y0: u32,
    in_row0: u32,
    n_out_rows: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct HeatParams {
    rect: [f32; 4],
    target_size: [f32; 2],
    vmin: f32,
    vmax: f32,
    img_w: u32,
    img_h: u32,
    _pad: [u32; 2],
}

fn storage_entry(binding: u32, read_only: bool, visibility: wgpu::ShaderStages) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn uniform_entry(binding: u32, visibility: wgpu::ShaderStages) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility,
        ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Uniform, has_dynamic_offset: false, min_binding_size: None },
        count: None,
    }
}

impl Renderer {
    /// Opens the best available adapter (a GPU through Vulkan/Metal/DX12, else a software
    /// Vulkan driver such as lavapipe) and builds the pipelines.
    ///
    /// Returns [`VizError::NoAdapter`] when there is none, with install instructions.
    pub fn new() -> Result<Renderer, VizError> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            ..Default::default()
        }))
        .map_err(|e| VizError::NoAdapter { detail: e.to_string() })?;
        let info = adapter.get_info();
        let adapter_name = format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type);
        let alimits = adapter.limits();
        let required_limits = wgpu::Limits {
            max_storage_buffer_binding_size: alimits.max_storage_buffer_binding_size,
            max_buffer_size: alimits.max_buffer_size,
            max_texture_dimension_2d: alimits.max_texture_dimension_2d,
            max_compute_workgroups_per_dimension: alimits.max_compute_workgroups_per_dimension,
            ..wgpu::Limits::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("compactor-viz"),
            required_features: wgpu::Features::empty(),
            required_limits: required_limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| VizError::Device { adapter: adapter_name.clone(), detail: e.to_string() })?;
        let max_chunk_bytes = (required_limits.max_storage_buffer_binding_size as u64)
            .min(required_limits.max_buffer_size)
            .min(1 << 30)
            / 4
            * 4;

        // --- mesh pipeline (epaint shapes + text)
        let mesh_shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("mesh.wgsl"),
            source: wgpu::ShaderSource::Wgsl(include_str!("../../../shaders/mesh.wgsl").into()),
        });
        let mesh_bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("mesh bgl"),
            entries: &[
                uniform_entry(0, wgpu::ShaderStages::VERTEX),
                wgpu::BindGroupLayoutEntry {
                    binding: 1,
                    visibility: wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Texture {
                        sample_type: wgpu::TextureSampleType::Float { filterable: true },
                        view_dimension: wgpu::TextureViewDimension::D2,
                        multisampled: false,
                    },
                    count: None,
                },
                wgpu::BindGroupLayoutEntry {
                    binding: 2,
                    visibility: wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Sampler(wgpu::SamplerBindingType::Filtering),
                    count: None,
                },
            ],
        });
        let mesh_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("mesh layout"),
            bind_group_layouts: &[Some(&mesh_bgl)],
            immediate_size: 0,
        });
        let premultiplied = wgpu::BlendState {
            color: wgpu::BlendComponent {
                src_factor: wgpu::BlendFactor::One,
                dst_factor: wgpu::BlendFactor::OneMinusSrcAlpha,
                operation: wgpu::BlendOperation::Add,
            },
            alpha: wgpu::BlendComponent {
                src_factor: wgpu::BlendFactor::One,
                dst_factor: wgpu::BlendFactor::OneMinusSrcAlpha,
                operation: wgpu::BlendOperation::Add,
            },
        };
        let mesh_pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
            label: Some("mesh pipeline"),
            layout: Some(&mesh_layout),
            vertex: wgpu::VertexState {
                module: &mesh_shader,
                entry_point: Some("vs_main"),
                compilation_options: Default::default(),
                buffers: &[Some(wgpu::VertexBufferLayout {
                    array_stride: std::mem::size_of::<epaint::Vertex>() as u64,
                    step_mode: wgpu::VertexStepMode::Vertex,
                    attributes: &wgpu::vertex_attr_array![0 => Float32x2, 1 => Float32x2, 2 => Unorm8x4],
                })],
            },
            primitive: wgpu::PrimitiveState::default(),
            depth_stencil: None,
            multisample: wgpu::MultisampleState::default(),
            fragment: Some(wgpu::FragmentState {
                module: &mesh_shader,
                entry_point: Some("fs_main"),
                compilation_options: Default::default(),
                targets: &[Some(wgpu::ColorTargetState {
                    format: TARGET_FORMAT,
                    blend: Some(premultiplied),
                    write_mask: wgpu::ColorWrites::ALL,
                })],
            }),
            multiview_mask: None,
            cache: None,
        });
        let sampler = device.create_sampler(&wgpu::SamplerDescriptor {
            label: Some("font atlas sampler"),
            mag_filter: wgpu::FilterMode::Linear,
            min_filter: wgpu::FilterMode::Linear,
            ..Default::default()
        });

        // --- heatmap color-map pipeline
        let heat_shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("heatmap.wgsl"),
            source: wgpu::ShaderSource::Wgsl(include_str!("../../../shaders/heatmap.wgsl").into()),
        });
        let vf = wgpu::ShaderStages::VERTEX | wgpu::ShaderStages::FRAGMENT;
        let heat_bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("heat bgl"),
            entries: &[
                uniform_entry(0, vf),
                storage_entry(1, true, wgpu::ShaderStages::FRAGMENT),
                storage_entry(2, true, wgpu::ShaderStages::FRAGMENT),
            ],
        });
        let heat_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("heat layout"),
            bind_group_layouts: &[Some(&heat_bgl)],
            immediate_size: 0,
        });
        let heat_pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
            label: Some("heat pipeline"),
            layout: Some(&heat_layout),
            vertex: wgpu::VertexState {
                module: &heat_shader,
                entry_point: Some("vs_main"),
                compilation_options: Default::default(),
                buffers: &[],
            },
            primitive: wgpu::PrimitiveState::default(),
            depth_stencil: None,
            multisample: wgpu::MultisampleState::default(),
            fragment: Some(wgpu::FragmentState {
                module: &heat_shader,
                entry_point: Some("fs_main"),
                compilation_options: Default::default(),
                targets: &[Some(wgpu::ColorTargetState { format: TARGET_FORMAT, blend: None, write_mask: wgpu::ColorWrites::ALL })],
            }),
            multiview_mask: None,
            cache: None,
        });

        // --- block reduction compute pipeline
        let reduce_shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("reduce.wgsl"),
            source: wgpu::ShaderSource::Wgsl(include_str!("../../../shaders/reduce.wgsl").into()),
        });
        let reduce_bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("reduce bgl"),
            entries: &[
                uniform_entry(0, wgpu::ShaderStages::COMPUTE),
                storage_entry(1, true, wgpu::ShaderStages::COMPUTE),
                storage_entry(2, false, wgpu::ShaderStages::COMPUTE),
            ],
        });
        let reduce_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("reduce layout"),
            bind_group_layouts: &[Some(&reduce_bgl)],
            immediate_size: 0,
        });
        let reduce_pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("reduce pipeline"),
            layout: Some(&reduce_layout),
            module: &reduce_shader,
            entry_point: Some("reduce_main"),
            compilation_options: Default::default(),
            cache: None,
        });

        let make_lut = |map: Colormap| {
            let lut = colormap::lut(map);
            let buf = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("colormap lut"),
                size: 256 * 4,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            queue.write_buffer(&buf, 0, bytemuck::cast_slice(&lut));
            buf
        };
        let lut_viridis = make_lut(Colormap::Viridis);
        let lut_magma = make_lut(Colormap::Magma);

        let fonts = epaint::Fonts::new(text_options(), epaint::text::FontDefinitions::default());

        Ok(Renderer {
            device,
            queue,
            adapter_name,
            max_chunk_bytes,
            mesh_pipeline,
            mesh_bgl,
            sampler,
            heat_pipeline,
            heat_bgl,
            reduce_pipeline,
            reduce_bgl,
            lut_viridis,
            lut_magma,
            fonts: Mutex::new(fonts),
        })
    }

    /// Caps the bytes of matrix uploaded per compute dispatch (normally the device's
    /// storage-buffer limit); for testing the chunked upload path.
    #[doc(hidden)]
    pub fn with_chunk_limit(mut self, bytes: u64) -> Self {
        self.max_chunk_bytes = (bytes / 4 * 4).clamp(4, self.max_chunk_bytes);
        self
    }

    /// Name, backend and type of the adapter in use (e.g. "llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)").
    pub fn adapter_name(&self) -> &str {
        &self.adapter_name
    }

    /// Reduces the row-major `rows × cols` matrix to `out_w × out_h` values on the GPU with
    /// `shaders/reduce.wgsl`; the same blocks and formula as [`crate::reduce_blocks_cpu`].
    /// Large matrices are uploaded in chunks that fit the device's storage-buffer limit.
    pub fn reduce_blocks_gpu(
        &self,
        rows: usize,
        cols: usize,
        data: &[f32],
        out_w: usize,
        out_h: usize,
        mode: ReduceMode,
    ) -> Result<Vec<f32>, VizError> {
        let buf = self.reduce_to_buffer(rows, cols, data, out_w, out_h, mode)?;
        let bytes = self.read_buffer(&buf, (out_w * out_h * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Runs the reduction and leaves the result in a GPU storage buffer (also COPY_SRC).
    pub(crate) fn reduce_to_buffer(
        &self,
        rows: usize,
        cols: usize,
        data: &[f32],
        out_w: usize,
        out_h: usize,
        mode: ReduceMode,
    ) -> Result<wgpu::Buffer, VizError> {
        if rows == 0 || cols == 0 || out_w == 0 || out_h == 0 {
            return Err(VizError::InvalidInput(format!("empty reduction {rows}x{cols} -> {out_w}x{out_h}")));
        }
        if data.len() != rows * cols {
            return Err(VizError::InvalidInput(format!(
                "matrix data has {} values, expected rows*cols = {rows}*{cols} = {}",
                data.len(),
                rows * cols
            )));
        }
        let fits_u32 = |a: usize, b: usize| (a as u64 + 1) * (b as u64) < u32::MAX as u64;
        if !fits_u32(out_h, rows) || !fits_u32(out_w, cols) {
            return Err(VizError::InvalidInput(format!("matrix {rows}x{cols} too large for an {out_w}x{out_h} image")));
        }
        let row_bytes = cols as u64 * 4;
        let max_rows = (self.max_chunk_bytes / row_bytes) as usize;
        let out_buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("reduced image"),
            size: (out_w * out_h * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut y0 = 0;
        while y0 < out_h {
            let r_start = block_range(y0, rows, out_h).0;
            let mut y1 = y0;
            while y1 < out_h && block_range(y1, rows, out_h).1 - r_start <= max_rows {
                y1 += 1;
            }
            if y1 == y0 {
                return Err(VizError::Gpu(format!(
                    "one image row needs more than the device's storage buffer limit ({} bytes)",
                    self.max_chunk_bytes
                )));
            }
            let r_end = block_range(y1 - 1, rows, out_h).1;
            let chunk = &data[r_start * cols..r_end * cols];
            let data_buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("matrix chunk"),
                size: (chunk.len() * 4) as u64,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: true,
            });
            data_buf
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| VizError::Gpu(format!("mapping the upload buffer: {e}")))?
                .copy_from_slice(bytemuck::cast_slice(chunk));
            data_buf.unmap();
            let params = ReduceParams {
                rows: rows as u32,
                cols: cols as u32,
                out_w: out_w as u32,
                out_h: out_h as u32,
                mode: match mode {
                    ReduceMode::Max => 0,
                    ReduceMode::Rms => 1,
                },
                out_y0: y0 as u32,
                in_row0: r_start as u32,
                n_out_rows: (y1 - y0) as u32,
            };
            let params_buf = self.uniform_buffer(bytemuck::bytes_of(&params));
            let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("reduce bg"),
                layout: &self.reduce_bgl,
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: params_buf.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: data_buf.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 2, resource: out_buf.as_entire_binding() },
                ],
            });
            let mut enc = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&self.reduce_pipeline);
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups((out_w as u32).div_ceil(8), ((y1 - y0) as u32).div_ceil(8), 1);
            }
            self.queue.submit([enc.finish()]);
            y0 = y1;
        }
        Ok(out_buf)
    }

    fn uniform_buffer(&self, bytes: &[u8]) -> wgpu::Buffer {
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("uniforms"),
            size: bytes.len() as u64,
            usage: wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: true,
        });
        buf.slice(..).get_mapped_range_mut().expect("freshly created mapped buffer").copy_from_slice(bytes);
        buf.unmap();
        buf
    }

    /// Copies `size` bytes of `src` (which must have COPY_SRC) back to the CPU.
    pub(crate) fn read_buffer(&self, src: &wgpu::Buffer, size: u64) -> Result<Vec<u8>, VizError> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, 0, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        self.map_and_read(&staging)
    }

    fn map_and_read(&self, staging: &wgpu::Buffer) -> Result<Vec<u8>, VizError> {
        let slot: Arc<Mutex<Option<Result<(), wgpu::BufferAsyncError>>>> = Arc::new(Mutex::new(None));
        let s2 = slot.clone();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            *s2.lock().unwrap() = Some(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| VizError::Gpu(format!("waiting for the GPU: {e}")))?;
        match slot.lock().unwrap().take() {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(VizError::Gpu(format!("mapping the read-back buffer: {e}"))),
            None => return Err(VizError::Gpu("read-back buffer was not mapped".into())),
        }
        let bytes = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| VizError::Gpu(format!("reading the mapped buffer: {e}")))?
            .to_vec();
        staging.unmap();
        Ok(bytes)
    }

    fn lut_buffer(&self, map: Colormap) -> &wgpu::Buffer {
        match map {
            Colormap::Viridis => &self.lut_viridis,
            Colormap::Magma => &self.lut_magma,
        }
    }

    /// Draws a frame into a fresh texture and reads it back as RGBA8.
    pub(crate) fn draw(&self, frame: Frame) -> Result<RgbaImage, VizError> {
        let (w, h) = (frame.width_px, frame.height_px);
        let max_side = self.device.limits().max_texture_dimension_2d;
        if w == 0 || h == 0 || w > max_side || h > max_side {
            return Err(VizError::InvalidInput(format!("image size {w}x{h} pixels is outside 1..={max_side}")));
        }
        let target = self.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("chart target"),
            size: wgpu::Extent3d { width: w, height: h, depth_or_array_layers: 1 },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: TARGET_FORMAT,
            usage: wgpu::TextureUsages::RENDER_ATTACHMENT | wgpu::TextureUsages::COPY_SRC,
            view_formats: &[],
        });
        let target_view = target.create_view(&Default::default());

        // font atlas
        let [aw, ah] = frame.atlas.size;
        let atlas = self.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("font atlas"),
            size: wgpu::Extent3d { width: aw as u32, height: ah as u32, depth_or_array_layers: 1 },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba8Unorm,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        self.queue.write_texture(
            wgpu::TexelCopyTextureInfo { texture: &atlas, mip_level: 0, origin: wgpu::Origin3d::ZERO, aspect: wgpu::TextureAspect::All },
            bytemuck::cast_slice(&frame.atlas.pixels),
            wgpu::TexelCopyBufferLayout { offset: 0, bytes_per_row: Some(4 * aw as u32), rows_per_image: Some(ah as u32) },
            wgpu::Extent3d { width: aw as u32, height: ah as u32, depth_or_array_layers: 1 },
        );
        let atlas_view = atlas.create_view(&Default::default());
        let screen = [w as f32 / frame.scale, h as f32 / frame.scale, 0.0, 0.0];
        let screen_buf = self.uniform_buffer(bytemuck::cast_slice(&screen));
        let mesh_bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("mesh bg"),
            layout: &self.mesh_bgl,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: screen_buf.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: wgpu::BindingResource::TextureView(&atlas_view) },
                wgpu::BindGroupEntry { binding: 2, resource: wgpu::BindingResource::Sampler(&self.sampler) },
            ],
        });

        // one vertex and one index buffer for all meshes
        let mut vertices: Vec<epaint::Vertex> = Vec::new();
        let mut indices: Vec<u32> = Vec::new();
        let mut draws: Vec<(std::ops::Range<u32>, i32, [u32; 4])> = Vec::new();
        for cp in &frame.primitives {
            let Primitive::Mesh(mesh) = &cp.primitive else { continue };
            if mesh.indices.is_empty() {
                continue;
            }
            let r = cp.clip_rect;
            let x0 = (r.min.x * frame.scale).round().clamp(0.0, w as f32) as u32;
            let y0 = (r.min.y * frame.scale).round().clamp(0.0, h as f32) as u32;
            let x1 = (r.max.x * frame.scale).round().clamp(0.0, w as f32) as u32;
            let y1 = (r.max.y * frame.scale).round().clamp(0.0, h as f32) as u32;
            if x1 <= x0 || y1 <= y0 {
                continue;
            }
            let base = vertices.len() as i32;
            let start = indices.len() as u32;
            vertices.extend_from_slice(&mesh.vertices);
            indices.extend_from_slice(&mesh.indices);
            draws.push((start..indices.len() as u32, base, [x0, y0, x1 - x0, y1 - y0]));
        }
        let vbuf = self.init_buffer(bytemuck::cast_slice(&vertices), wgpu::BufferUsages::VERTEX);
        let ibuf = self.init_buffer(bytemuck::cast_slice(&indices), wgpu::BufferUsages::INDEX);

        let heat_bg = frame.heat.as_ref().map(|heat| {
            let p = HeatParams {
                rect: heat.rect_px.map(|v| v as f32),
                target_size: [w as f32, h as f32],
                vmin: heat.vmin,
                vmax: heat.vmax,
                img_w: heat.img_w,
                img_h: heat.img_h,
                _pad: [0; 2],
            };
            let pbuf = self.uniform_buffer(bytemuck::bytes_of(&p));
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("heat bg"),
                layout: &self.heat_bgl,
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: pbuf.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: heat.values.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 2, resource: self.lut_buffer(heat.colormap).as_entire_binding() },
                ],
            })
        });

        let padded_row = (4 * w).div_ceil(256) * 256;
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("image readback"),
            size: padded_row as u64 * h as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_render_pass(&wgpu::RenderPassDescriptor {
                label: Some("chart pass"),
                color_attachments: &[Some(wgpu::RenderPassColorAttachment {
                    view: &target_view,
                    depth_slice: None,
                    resolve_target: None,
                    ops: wgpu::Operations { load: wgpu::LoadOp::Clear(wgpu::Color::WHITE), store: wgpu::StoreOp::Store },
                })],
                depth_stencil_attachment: None,
                timestamp_writes: None,
                occlusion_query_set: None,
                multiview_mask: None,
            });
            if let (Some(bg), Some(heat)) = (&heat_bg, &frame.heat) {
                let [x, y, hw, hh] = heat.rect_px;
                let x1 = (x + hw).min(w);
                let y1 = (y + hh).min(h);
                if x1 > x && y1 > y {
                    pass.set_scissor_rect(x, y, x1 - x, y1 - y);
                    pass.set_pipeline(&self.heat_pipeline);
                    pass.set_bind_group(0, bg, &[]);
                    pass.draw(0..6, 0..1);
                }
            }
            if let (Some(vbuf), Some(ibuf)) = (&vbuf, &ibuf) {
                pass.set_pipeline(&self.mesh_pipeline);
                pass.set_bind_group(0, &mesh_bg, &[]);
                pass.set_vertex_buffer(0, vbuf.slice(..));
                pass.set_index_buffer(ibuf.slice(..), wgpu::IndexFormat::Uint32);
                for (range, base, [x, y, sw, sh]) in &draws {
                    pass.set_scissor_rect(*x, *y, *sw, *sh);
                    pass.draw_indexed(range.clone(), *base, 0..1);
                }
            }
        }
        enc.copy_texture_to_buffer(
            wgpu::TexelCopyTextureInfo { texture: &target, mip_level: 0, origin: wgpu::Origin3d::ZERO, aspect: wgpu::TextureAspect::All },
            wgpu::TexelCopyBufferInfo {
                buffer: &readback,
                layout: wgpu::TexelCopyBufferLayout { offset: 0, bytes_per_row: Some(padded_row), rows_per_image: Some(h) },
            },
            wgpu::Extent3d { width: w, height: h, depth_or_array_layers: 1 },
        );
        self.queue.submit([enc.finish()]);
        let bytes = self.map_and_read(&readback)?;
        let mut pixels = Vec::with_capacity((4 * w * h) as usize);
        for row in bytes.chunks(padded_row as usize) {
            pixels.extend_from_slice(&row[..(4 * w) as usize]);
        }
        Ok(RgbaImage { width: w, height: h, pixels })
    }

    fn init_buffer(&self, bytes: &[u8], usage: wgpu::BufferUsages) -> Option<wgpu::Buffer> {
        if bytes.is_empty() {
            return None;
        }
        // vertices (20 bytes) and u32 indices: always a multiple of 4 bytes, as mapping needs
        debug_assert_eq!(bytes.len() % 4, 0);
        let size = bytes.len() as u64;
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor { label: None, size, usage, mapped_at_creation: true });
        buf.slice(..).get_mapped_range_mut().expect("freshly created mapped buffer").copy_from_slice(bytes);
        buf.unmap();
        Some(buf)
    }
}

pub(crate) fn text_options() -> epaint::TextOptions {
    epaint::TextOptions { max_texture_side: 4096, ..Default::default() }
}
