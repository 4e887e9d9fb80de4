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

export function UsagePage({ active }: { active: boolean }) {
  const [usage, setUsage] = useState<Usage | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    if (active) call<Usage>('GET', '/v1/usage').then(setUsage, (e: Error) => setError(e.message));
  }, [active]);

  const days = usage?.data ?? [];
  const x = days.map((d) => seconds(d.day));
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
                data={[x, days.map((d) => d.requests)]}
                series={[{ label: 'requests', stroke: '#1d4ed8' }]}
              />
              <Chart
                title="Tokens per day"
                xLabel="day"
                yLabel="tokens"
                time
                data={[x, days.map((d) => d.prompt_tokens), days.map((d) => d.completion_tokens), days.map((d) => d.training_tokens)]}
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
