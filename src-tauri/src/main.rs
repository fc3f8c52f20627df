//! The Compactor desktop app: a Tauri v2 shell over the engine crates.
//!
//! Every command is a thin call into `compactor-core` / `compactor-decomp` / `compactor-viz` /
//! `compactor-report`. Long work runs on the blocking thread pool (never on the UI thread),
//! reports through an IPC [`tauri::ipc::Channel`] and can be cancelled by job id. Dialogs are
//! opened from Rust (the page has no dialog, file-system or shell permission); the page only
//! calls the commands listed in `capabilities/default.json`.

#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

mod commands;
mod images;
mod progress;

use std::path::PathBuf;

/// A model directory to open at start: `compactor-app [--open] DIR`, else `COMPACTOR_APP_OPEN`.
fn startup_model() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        if a == "--open" {
            return args.next().map(PathBuf::from);
        }
        let s = a.to_string_lossy();
        if s == "--help" || s == "-h" {
            println!("compactor-app [--open MODEL_DIR]\n\nThe Compactor desktop app. MODEL_DIR (or the environment variable COMPACTOR_APP_OPEN) is opened at start.");
            std::process::exit(0);
        }
        if !s.starts_with('-') {
            return Some(PathBuf::from(a));
        }
    }
    std::env::var_os("COMPACTOR_APP_OPEN").filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn main() {
    let startup = startup_model();
    #[cfg(target_os = "linux")]
    if std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        eprintln!("compactor-app: no display (neither DISPLAY nor WAYLAND_DISPLAY is set): the desktop app needs a graphical session; for a headless run use `scripts/demo.sh` without --gui");
        std::process::exit(1);
    }
    tauri::Builder::default()
        .plugin(tauri_plugin_dialog::init())
        .manage(commands::AppState::new(startup))
        .invoke_handler(tauri::generate_handler![
            commands::app_info,
            commands::pick_path,
            commands::open_model,
            commands::load_spectra,
            commands::layer_view,
            commands::heat_value,
            commands::preview_plan,
            commands::load_plan,
            commands::save_plan,
            commands::run_plan,
            commands::cancel_job,
            commands::compare,
            commands::save_report,
        ])
        .run(tauri::generate_context!())
        .unwrap_or_else(|e| {
            eprintln!("compactor-app: could not start the window: {e}");
            std::process::exit(1);
        });
}
