// Compactor's desktop frontend: a workbench of six steps over the engine's commands.
import "./style.css";
import { api, errorText } from "./api";
import { h } from "./dom";
import { mountShell, navigate, refreshNav, showError } from "./shell";
import { state } from "./state";
import "./screens/layers";
import "./screens/layerview";
import "./screens/plan";
import "./screens/run";
import "./screens/compare";
import { openModel } from "./screens/open";

async function boot(): Promise<void> {
  const root = document.getElementById("app")!;
  mountShell(root);
  try {
    state.info = await api.appInfo();
  } catch (e) {
    navigate("open");
    showError(`The app could not talk to its engine: ${errorText(e)}`);
    return;
  }
  refreshNav();
  navigate("open");
  const start = state.info.startup_model;
  if (start && (await openModel(start))) navigate("layers");
}

boot().catch((e) => {
  const root = document.getElementById("app");
  root?.replaceChildren(h("div", { class: "fatal" }, h("h1", null, "Compactor could not start"), h("p", null, errorText(e))));
});
