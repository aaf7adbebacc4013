// sd-webui-perfusion: a small completion hint for <perfusion:NAME> in the prompt boxes.
(function() {
    let names = null;
    let loading = false;

    function loadNames() {
        if (loading) return;
        loading = true;
        fetch("./perfusion/v1/concepts", {credentials: "same-origin"})
            .then(r => r.ok ? r.json() : [])
            .then(list => { names = list.filter(c => c.compatible !== false).map(c => c.name); })
            .catch(() => { names = []; })
            .finally(() => { loading = false; });
    }

    function hintFor(textarea) {
        const upto = textarea.value.slice(0, textarea.selectionStart);
        const m = upto.match(/<perfusion:([^:>]*)$/i);
        if (!m) return null;
        if (names === null) { loadNames(); return "loading concepts…"; }
        const prefix = m[1].toLowerCase();
        const hits = names.filter(n => n.toLowerCase().startsWith(prefix)).slice(0, 8);
        if (!hits.length) return "no Perfusion concept starts with \"" + m[1] + "\"";
        return "Perfusion: " + hits.map(n => "<perfusion:" + n + ">").join("  ") + "   (Tab completes the first)";
    }

    function attach(textarea) {
        if (textarea.dataset.perfusionHint) return;
        textarea.dataset.perfusionHint = "1";
        const box = document.createElement("div");
        box.className = "perfusion-hint";
        box.style.display = "none";
        textarea.parentElement.appendChild(box);
        textarea.addEventListener("input", () => {
            const hint = hintFor(textarea);
            box.textContent = hint || "";
            box.style.display = hint ? "block" : "none";
        });
        textarea.addEventListener("blur", () => { box.style.display = "none"; });
        textarea.addEventListener("keydown", (e) => {
            if (e.key !== "Tab" || box.style.display === "none" || !names) return;
            const pos = textarea.selectionStart;
            const upto = textarea.value.slice(0, pos);
            const m = upto.match(/<perfusion:([^:>]*)$/i);
            if (!m) return;
            const hit = names.find(n => n.toLowerCase().startsWith(m[1].toLowerCase()));
            if (!hit) return;
            e.preventDefault();
            const insert = hit.slice(m[1].length) + ">";
            textarea.value = upto + insert + textarea.value.slice(pos);
            textarea.selectionStart = textarea.selectionEnd = pos + insert.length;
            updateInput(textarea);
            box.style.display = "none";
        });
    }

    onUiLoaded(function() {
        ["txt2img_prompt", "txt2img_neg_prompt", "img2img_prompt", "img2img_neg_prompt"].forEach(id => {
            const ta = gradioApp().querySelector("#" + id + " textarea");
            if (ta) attach(ta);
        });
    });
    onUiUpdate(function() { if (names !== null && !loading && Math.random() < 0.01) names = null; });
})();
