/* Evaluation page: one key per vote (a = A better, b = B better, t = tie, x = both bad).
   The buttons carry data-shortcut; htmx posts the vote and swaps in the next example. */
(function () {
  "use strict";

  document.addEventListener("keydown", function (e) {
    var target = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    if (target && (/^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName) || target.isContentEditable)) return;
    var button = document.querySelector('#example-view [data-shortcut="' + e.key.toLowerCase() + '"]');
    // While a vote is being sent the buttons are disabled (hx-disabled-elt), so a second press cannot
    // re-vote the same example as "changed after the reveal".
    if (!button || button.matches(":disabled")) return;
    e.preventDefault();
    button.click();
  });
})();
