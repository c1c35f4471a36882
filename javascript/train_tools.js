// Train Tools tab helpers. The WebUI injects every file in javascript/ into the page's global scope,
// so every name here starts with "trainTools".

// Copy the <lora:name:weight> tag a results-table button carries, and say so on the button.
function trainToolsCopyText(button) {
    var text = button.getAttribute("data-text") || button.textContent;
    var done = function () {
        var before = button.textContent;
        button.textContent = "copied";
        setTimeout(function () { button.textContent = before; }, 1200);
    };
    if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, function () { trainToolsCopyFallback(text); done(); });
    } else {
        trainToolsCopyFallback(text);
        done();
    }
    return false;
}

// Clipboard API is missing on plain http to another machine (--listen 0.0.0.0): use a hidden textarea.
function trainToolsCopyFallback(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try {
        document.execCommand("copy");
    } catch (e) {
        console.warn("Train Tools: could not copy", e);
    }
    document.body.removeChild(area);
}
