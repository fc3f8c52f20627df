//! Without a usable adapter, `Renderer::new` returns `NoAdapter` (never panics) and the
//! message says how to install lavapipe. Its own test binary, because it changes the
//! process environment: WGPU_BACKEND=metal leaves no backend that exists on Linux.

#[cfg(target_os = "linux")]
#[test]
fn missing_adapter_is_a_clear_error() {
    std::env::set_var("WGPU_BACKEND", "metal");
    match compactor_viz::Renderer::new() {
        Err(e @ compactor_viz::VizError::NoAdapter { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("apt-get install mesa-vulkan-drivers libvulkan1"), "{msg}");
        }
        Err(other) => panic!("expected NoAdapter, got {other}"),
        Ok(r) => panic!("expected NoAdapter, got adapter {}", r.adapter_name()),
    }
}
