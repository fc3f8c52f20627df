import { defineConfig } from "vite";

// The app loads the built files from the Tauri asset protocol: relative URLs, no inline
// scripts or styles (the CSP allows only 'self'), one JS and one CSS file.
export default defineConfig({
  base: "./",
  clearScreen: false,
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2021",
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    sourcemap: false,
  },
});
