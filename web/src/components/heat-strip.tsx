import type { AppliedEdit } from '../api.ts';

/**
 * The edit's readout: for each applied intervention (a row), the size ‖c(h)‖ of its coefficient
 * vector at each prompt token it edited (a column), as a shade and as the number itself, the
 * whole vector in the cell's title. Unedited tokens show a dash.
 */
const SHADES = 6;

export function HeatStrip({ edits, tokens, names }: { edits: AppliedEdit[][]; tokens: string[]; names: string[] }) {
  const norm = (c: number[]) => Math.sqrt(c.reduce((s, x) => s + x * x, 0));
  const rows = edits.flatMap((item, i) =>
    item.map((edit) => ({ label: `${names[i] ?? `item ${i + 1}`} · layer ${edit.layer}`, edit, norms: edit.coefficients.map(norm) })),
  );
  const max = Math.max(1e-9, ...rows.flatMap((r) => r.norms));
  const width = Math.max(tokens.length, ...rows.flatMap((r) => r.edit.positions.map((p) => p + 1)));
  const columns = Array.from({ length: width }, (_, i) => i);
  const show = (t: string | undefined, i: number) => (t === undefined ? `#${i}` : t.replace(/▁/g, ' ').replace(/Ġ/g, ' ') || '∅');

  return (
    <figure class="heat" data-testid="heat-strip">
      <figcaption>Edit coefficients ‖c(h)‖ at each prompt token (darker is larger; the number is the size)</figcaption>
      <div class="heat-scroll">
        <table>
          <thead>
            <tr>
              <th scope="col">intervention</th>
              {columns.map((i) => (
                <th scope="col" key={i} class="token">
                  {show(tokens[i], i)}
                </th>
              ))}
            </tr>
          </thead>
          <tbody>
            {rows.map((r, ri) => (
              <tr key={ri}>
                <th scope="row">{r.label}</th>
                {columns.map((i) => {
                  const at = r.edit.positions.indexOf(i);
                  if (at < 0)
                    return (
                      <td key={i} class="heat-none" title="not edited">
                        –
                      </td>
                    );
                  const n = r.norms[at];
                  const shade = Math.min(SHADES - 1, Math.floor((n / max) * SHADES));
                  return (
                    <td key={i} class={`heat-${shade}`} title={`c = [${r.edit.coefficients[at].map((x) => x.toFixed(3)).join(', ')}]`}>
                      {n.toFixed(2)}
                    </td>
                  );
                })}
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </figure>
  );
}
