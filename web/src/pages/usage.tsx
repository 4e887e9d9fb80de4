import { useEffect, useState } from 'preact/hooks';
import { call } from '../api.ts';
import { Chart } from '../components/chart.tsx';

/** Usage: the tenant's requests and tokens per day (UTC), as charts and as a table. */
interface Day {
  day: string;
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  training_tokens: number;
}
interface Usage {
  from: string;
  to: string;
  data: Day[];
  totals: Omit<Day, 'day'>;
}

const seconds = (day: string) => Date.parse(`${day}T00:00:00Z`) / 1000;

function everyDay(from: string, to: string): string[] {
  const out: string[] = [];
  for (let t = seconds(from); t <= seconds(to) && out.length < 400; t += 86_400) out.push(new Date(t * 1000).toISOString().slice(0, 10));
  return out;
}

export function UsagePage({ active }: { active: boolean }) {
  const [usage, setUsage] = useState<Usage | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    if (active) call<Usage>('GET', '/v1/usage').then(setUsage, (e: Error) => setError(e.message));
  }, [active]);

  const days = usage?.data ?? [];
  // every day of the period on the chart, the days without use at 0
  const period = usage ? everyDay(usage.from, usage.to) : [];
  const byDay = new Map(days.map((d) => [d.day, d]));
  const series = (k: keyof Omit<Day, 'day'>) => period.map((day) => byDay.get(day)?.[k] ?? 0);
  const x = period.map(seconds);
  return (
    <>
      <h2 id="usage-title">Usage</h2>
      {error && <p role="alert">Could not read usage: {error}</p>}
      {usage && (
        <>
          <p>
            From {usage.from} to {usage.to} (UTC): <strong data-testid="usage-requests">{usage.totals.requests}</strong> requests,{' '}
            {usage.totals.prompt_tokens} prompt tokens, {usage.totals.completion_tokens} completion tokens, {usage.totals.training_tokens}{' '}
            training tokens. Usage is written every few seconds.
          </p>
          {days.length === 0 ? (
            <p>No usage in this period yet.</p>
          ) : (
            <div class="charts">
              <Chart
                title="Requests per day"
                xLabel="day"
                yLabel="requests"
                time
                bars
                data={[x, series('requests')]}
                series={[{ label: 'requests', stroke: '#1d4ed8' }]}
              />
              <Chart
                title="Tokens per day"
                xLabel="day"
                yLabel="tokens"
                time
                data={[x, series('prompt_tokens'), series('completion_tokens'), series('training_tokens')]}
                series={[
                  { label: 'prompt', stroke: '#1d4ed8' },
                  { label: 'completion', stroke: '#b45309', dash: [8, 4] },
                  { label: 'training', stroke: '#047857', dash: [2, 3] },
                ]}
              />
            </div>
          )}
          <div class="table-scroll">
            <table data-testid="usage-table">
              <caption>By day</caption>
              <thead>
                <tr>
                  <th scope="col">Day</th>
                  <th scope="col">Requests</th>
                  <th scope="col">Prompt tokens</th>
                  <th scope="col">Completion tokens</th>
                  <th scope="col">Training tokens</th>
                </tr>
              </thead>
              <tbody>
                {days.map((d) => (
                  <tr key={d.day}>
                    <th scope="row">{d.day}</th>
                    <td>{d.requests}</td>
                    <td>{d.prompt_tokens}</td>
                    <td>{d.completion_tokens}</td>
                    <td>{d.training_tokens}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        </>
      )}
    </>
  );
}
